"""The built-in task: solver, gold judge, corruption, simulated annotators."""
import itertools
import math
import random
import statistics

import pytest

from rlhf_engine.pipeline import data, task


@pytest.mark.parametrize("prompt,answer", [
    ("reverse: abcc", "ccba"),
    ("sort: dbca", "abcd"),
    ("count a: abaca", "3"),
    ("count f: abaca", "0"),
    ("upper: face", "FACE"),
])
def test_solver(prompt, answer):
    assert task.solve(prompt) == answer
    assert task.gold_score(prompt, answer) == 1.0


def test_solver_scores_one_on_every_family():
    prompts = [p.prompt for p in task.make_prompts(400, seed=0)]
    assert {prompt.split(" ")[0].rstrip(":") for prompt in prompts} == set(task.FAMILIES)
    for prompt in prompts:
        word = prompt.split(": ")[1]
        assert set(word) <= set(task.ALPHABET)
        assert task.WORD_LENGTHS[0] <= len(word) <= task.WORD_LENGTHS[1]
        assert task.gold_score(prompt, task.solve(prompt)) == 1.0


@pytest.mark.parametrize("prompt", ["reverse abc", "reverse: ", "flip: abc", "count: abc", "count ab: abc",
                                    "sort x: abc"])
def test_invalid_prompts(prompt):
    with pytest.raises(ValueError, match="not a task prompt"):
        task.solve(prompt)


@pytest.mark.parametrize("a,b,distance", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2),
                                          ("abc", "abc", 0), ("ab", "ba", 2), ("abcdef", "azced", 3)])
def test_edit_distance(a, b, distance):
    assert task.edit_distance(a, b) == distance
    assert task.edit_distance(b, a) == distance


@pytest.mark.parametrize("prompt,response,score", [
    ("sort: dbca", "abce", 0.75),
    ("sort: dbca", "abcdxx", 1 - 2 / 6),    # extra text costs
    ("sort: dbca", "ab", 0.5),              # missing text costs
    ("sort: dbca", "abcd ", 0.8),           # whitespace is text
    ("sort: dbca", "", 0.0),
    ("upper: face", "face", 0.0),
    ("reverse: abc", "bca", 1 / 3),
    ("count a: abaca", "4", 0.5),           # a near count earns numeric credit
    ("count a: abaca", "0", 0.25),
    ("count a: abaca", "33", 0.5),          # edit similarity beats the numeric credit
    ("count a: abaca", "03", 0.5),          # not a canonical integer: edit similarity only
    ("count a: abaca", "x", 0.0),
])
def test_gold_score_values(prompt, response, score):
    assert task.gold_score(prompt, response) == pytest.approx(score, abs=1e-12)


def test_wrong_answers_score_lower():
    rng = random.Random(1)
    for p in task.make_prompts(200, seed=1):
        gold = task.solve(p.prompt)
        wrong = task.corrupt(gold, rng.randint(1, 3), rng)
        score = task.gold_score(p.prompt, wrong)
        assert 0.0 <= score <= 1.0
        assert (score == 1.0) == (wrong == gold)


def test_partial_credit_falls_with_corruption():
    prompts = [p.prompt for p in task.make_prompts(300, seed=2)]
    rng = random.Random(2)
    means = [statistics.mean(task.gold_score(p, task.corrupt(task.solve(p), n, rng)) for p in prompts)
             for n in range(5)]
    assert means[0] == 1.0
    assert all(later < earlier - 0.02 for earlier, later in zip(means, means[1:])), means


def test_corrupt_keeps_the_kind_of_characters():
    rng = random.Random(3)
    for text, allowed in [("abc", set(task.ALPHABET)), ("ABC", set(task.ALPHABET.upper())), ("7", set("0123456789"))]:
        for n_edits in range(6):
            out = task.corrupt(text, n_edits, rng)
            assert out and set(out) <= allowed
            assert len(text) - n_edits <= len(out) <= len(text) + n_edits
    assert task.corrupt("abc", 0, rng) == "abc"
    with pytest.raises(ValueError, match="n_edits"):
        task.corrupt("abc", -1, rng)


def _sigmoid(x):
    return 0.5 * (1.0 + math.tanh(0.5 * x))


@pytest.mark.parametrize("beta", [0.0, 4.0, 10.0])
def test_annotator_follows_bradley_terry(beta):
    # Whatever the candidates, P(chosen is the gold-better one) = sigmoid(beta * |g_a - g_b|):
    # the observed agreement must be within 4 standard deviations of its expectation.
    n = 2000
    comparisons = task.make_comparisons(n, seed=4, beta=beta)
    gaps = [task.gold_score(c.prompt, c.chosen) - task.gold_score(c.prompt, c.rejected) for c in comparisons]
    assert all(gap != 0 for gap in gaps)
    expected = [_sigmoid(beta * abs(gap)) for gap in gaps]
    agreement = sum(gap > 0 for gap in gaps)
    sd = math.sqrt(sum(p * (1 - p) for p in expected))
    assert abs(agreement - sum(expected)) < 4 * sd
    if beta == 0.0:
        assert abs(agreement / n - 0.5) < 4 * math.sqrt(0.25 / n)
    if beta == 10.0:
        assert agreement / n > 0.85


def test_noiseless_annotator_always_agrees():
    for c in task.make_comparisons(300, seed=5, beta=1e6):
        assert task.gold_score(c.prompt, c.chosen) > task.gold_score(c.prompt, c.rejected)


@pytest.mark.parametrize("beta", [0.0, 5.0])
def test_ranking_annotator_follows_plackett_luce(beta):
    # P(first place is a gold-best response) = sum over the best of softmax(beta * g).
    n, k = 1500, 3
    rankings = task.make_rankings(n, k, seed=6, beta=beta)
    expected, observed = [], 0
    for r in rankings:
        scores = [task.gold_score(r.prompt, response) for response in r.responses]
        weights = [math.exp(beta * s) for s in scores]
        expected.append(sum(w for w, s in zip(weights, scores) if s == max(scores)) / sum(weights))
        observed += scores[0] == max(scores)
        assert len(r.responses) == k == len(set(r.responses))
    sd = math.sqrt(sum(p * (1 - p) for p in expected))
    assert abs(observed - sum(expected)) < 4 * sd


def test_noiseless_ranking_is_sorted_by_gold():
    for r in task.make_rankings(200, 4, seed=7, beta=1e6):
        scores = [task.gold_score(r.prompt, response) for response in r.responses]
        assert scores == sorted(scores, reverse=True)


def test_demonstration_noise():
    clean = task.make_demonstrations(300, seed=8, noise=0.0)
    assert all(d.response == task.solve(d.prompt) for d in clean)
    noisy = task.make_demonstrations(2000, seed=8, noise=0.3)
    imperfect = sum(d.response != task.solve(d.prompt) for d in noisy) / len(noisy)
    # Each noisy answer gets 1 or 2 edits; two edits can cancel, so a little under 0.3.
    assert 0.22 < imperfect <= 0.3 + 4 * math.sqrt(0.3 * 0.7 / 2000)


def test_generators_are_deterministic_and_use_their_own_rng():
    makers = [lambda s: task.make_prompts(50, s), lambda s: task.make_demonstrations(50, s),
              lambda s: task.make_comparisons(50, s), lambda s: task.make_rankings(50, 3, s)]
    for make in makers:
        random.seed(0)
        first = make(11)
        random.seed(1)
        assert make(11) == first
        assert make(12) != first


def test_records_survive_the_jsonl_round_trip(tmp_path):
    sets = {"prompts": task.make_prompts(20, 0), "demonstrations": task.make_demonstrations(20, 0, noise=0.5),
            "comparisons": task.make_comparisons(20, 0), "rankings": task.make_rankings(20, 4, 0)}
    for kind, records in sets.items():
        path = tmp_path / f"{kind}.jsonl"
        data.write_jsonl(path, records)
        assert data.read_jsonl(path, kind) == records


@pytest.mark.parametrize("call,match", [
    (lambda: task.make_prompts(-1, 0), "n must be an int >= 0"),
    (lambda: task.make_demonstrations(5, 0, noise=1.5), "noise must be a number in"),
    (lambda: task.make_comparisons(5, 0, beta=-1.0), "beta must be a finite number >= 0"),
    (lambda: task.make_comparisons(5, 0, beta=math.nan), "beta must be a finite number >= 0"),
    (lambda: task.make_rankings(5, 1, 0), "k must be an int >= 2"),
    (lambda: task.gold_score("sort: abc", None), "response must be a string"),
])
def test_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plackett_luce_sampler_matches_its_distribution():
    # Every permutation's frequency against its exact probability
    # prod_i w[order[i]] / sum(w[order[i:]]), with w = exp(beta * score).
    scores, beta, n = [0.0, 1.0, 0.5], 2.0, 20000
    rng = random.Random(9)
    counts = {}
    for _ in range(n):
        order = tuple(task._plackett_luce(scores, beta, rng))
        counts[order] = counts.get(order, 0) + 1
    weights = [math.exp(beta * s) for s in scores]
    for order in itertools.permutations(range(3)):
        p = 1.0
        for i in range(3):
            p *= weights[order[i]] / sum(weights[j] for j in order[i:])
        assert abs(counts.get(order, 0) - n * p) < 4 * math.sqrt(n * p * (1 - p)), (order, counts, p)
