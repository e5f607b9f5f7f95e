"""The built-in synthetic instruction-following task: no download, small
enough for a byte-level tokenizer and a tiny model trained on a laptop CPU.

Prompts are ``"{family}: {word}"`` with a word of 3 to 8 letters from
:data:`ALPHABET`; the answer is short:

==========  ====================  ==========
family      prompt                answer
==========  ====================  ==========
reverse     ``reverse: abcc``     ``ccba``
sort        ``sort: dbca``        ``abcd``
count       ``count a: abaca``    ``3``
upper       ``upper: face``       ``FACE``
==========  ====================  ==========

The gold judge (:func:`gold_score`) gives partial credit; the data
generators stand in for human labellers: demonstrations from the gold solver
(optionally imperfect), comparisons and rankings of candidate responses of
varying quality, labelled by a simulated annotator with Bradley-Terry
(Plackett-Luce) noise on the gold score. Every generator is deterministic
given its seed (a private ``random.Random``, never the global RNG); call them
with different seeds for training and held-out sets.
"""
import math
import random
import re
from typing import List, Optional, Tuple

from rlhf_engine.pipeline.data import Comparison, Demonstration, Prompt, Ranking

ALPHABET = "abcdef"
WORD_LENGTHS = (3, 8)  # inclusive range of the prompt word's length
FAMILIES = ("reverse", "sort", "count", "upper")

# Candidate responses for comparisons and rankings: the gold answer, or with
# this probability the prompt's word echoed back (a typical mistake of an
# untrained model), then 0 to MAX_CANDIDATE_EDITS random edits.
ECHO_PROBABILITY = 0.25
MAX_CANDIDATE_EDITS = 3

_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")


def _parse(prompt: str) -> Tuple[str, Optional[str], str]:
    """``(family, letter or None, word)`` of a task prompt."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    head, sep, word = prompt.partition(": ")
    parts = head.split(" ")
    family = parts[0]
    valid = bool(sep) and bool(word) and family in FAMILIES and (
        len(parts) == 2 and len(parts[1]) == 1 if family == "count" else len(parts) == 1)
    if not valid:
        raise ValueError(f"prompt is not a task prompt ('<family>: <word>' or 'count <letter>: <word>'"
                         f" with family in {FAMILIES}): {prompt!r}")
    return family, parts[1] if family == "count" else None, word


def check_prompt(prompt: str) -> None:
    """Raise ValueError (saying what a task prompt looks like) unless
    ``prompt`` is a prompt of this task: the only prompts :func:`solve` and
    the gold judge (:func:`gold_score`) understand."""
    _parse(prompt)


def solve(prompt: str) -> str:
    """The gold answer to a task prompt."""
    family, letter, word = _parse(prompt)
    if family == "reverse":
        return word[::-1]
    if family == "sort":
        return "".join(sorted(word))
    if family == "count":
        return str(word.count(letter))
    return word.upper()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def similarity(response: str, gold: str) -> float:
    """``1 - edit_distance / max(len)``, in [0, 1]: extra text costs as much
    as missing text."""
    longest = max(len(response), len(gold))
    return 1.0 if longest == 0 else 1.0 - edit_distance(response, gold) / longest


def gold_score(prompt: str, response: str) -> float:
    """The gold judge's score of ``response`` in [0, 1]; 1 only for the
    exact answer (whitespace counts as text).

    :func:`similarity` to the gold answer; for ``count``, a canonical
    integer ``n`` scores at least ``1 / (1 + |n - gold|)`` so that a near
    count earns partial credit.
    """
    if not isinstance(response, str):
        raise ValueError(f"response must be a string, got {type(response).__name__}")
    gold = solve(prompt)
    score = similarity(response, gold)
    if _parse(prompt)[0] == "count" and _CANONICAL_INT.fullmatch(response):
        score = max(score, 1.0 / (1 + abs(int(response) - int(gold))))
    return score


def gold_reward(prompts: List[str], responses: List[str]) -> List[float]:
    """The gold judge as a reward function (:mod:`rlhf_engine.engine.rewards`):
    the :func:`gold_score` of each (prompt, response), for PPO against a
    verifiable reward (``rlhf-engine ppo --reward_funcs
    rlhf_engine.pipeline.task:gold_reward``, ``rlhf-engine pipeline --reward
    gold``). ValueError for a prompt that is not the task's or lists of
    different lengths."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def _charset(text: str) -> str:
    if text.isdigit():
        return "0123456789"
    return ALPHABET.upper() if text.isupper() else ALPHABET


def corrupt(text: str, n_edits: int, rng: random.Random) -> str:
    """``text`` after ``n_edits`` random edits (substitute, insert, delete,
    swap two neighbours) with characters of its own kind (digits, upper or
    lower case letters). Never empty; an edit can undo another."""
    if not text:
        raise ValueError("text is empty")
    if isinstance(n_edits, bool) or not isinstance(n_edits, int) or n_edits < 0:
        raise ValueError(f"n_edits must be an int >= 0, got {n_edits!r}")
    charset = _charset(text)
    chars = list(text)
    for _ in range(n_edits):
        op = rng.choice(("substitute", "insert", "delete", "swap"))
        if op == "insert":
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(charset))
        elif op == "delete" and len(chars) > 1:
            del chars[rng.randrange(len(chars))]
        elif op == "swap" and len(chars) > 1:
            i = rng.randrange(len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:
            i = rng.randrange(len(chars))
            chars[i] = rng.choice([c for c in charset if c != chars[i]])
    return "".join(chars)


def _random_prompt(rng: random.Random) -> str:
    family = rng.choice(FAMILIES)
    word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*WORD_LENGTHS)))
    head = f"count {rng.choice(ALPHABET)}" if family == "count" else family
    return f"{head}: {word}"


def _candidate(prompt: str, rng: random.Random) -> str:
    base = _parse(prompt)[2] if rng.random() < ECHO_PROBABILITY else solve(prompt)
    return corrupt(base, rng.randint(0, MAX_CANDIDATE_EDITS), rng)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or math.isinf(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")


def make_prompts(n: int, seed: int) -> List[Prompt]:
    """``n`` random task prompts, families drawn uniformly."""
    _check_count("n", n, 0)
    rng = random.Random(seed)
    return [Prompt(_random_prompt(rng)) for _ in range(n)]


def make_demonstrations(n: int, seed: int, noise: float = 0.25) -> List[Demonstration]:
    """``n`` demonstrations by the gold solver, a ``noise`` fraction of them
    (in expectation) imperfect: the gold answer after 1 or 2 random edits.

    The default is not 0 so that SFT does not learn the task perfectly and
    PPO, judged by the reward model, has mistakes left to remove.
    """
    _check_count("n", n, 0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
        raise ValueError(f"noise must be a number in [0, 1], got {noise!r}")
    rng = random.Random(seed)
    demonstrations = []
    for _ in range(n):
        prompt = _random_prompt(rng)
        response = solve(prompt)
        if rng.random() < noise:
            response = corrupt(response, rng.randint(1, 2), rng)
        demonstrations.append(Demonstration(prompt, response))
    return demonstrations


def make_comparisons(n: int, seed: int, beta: float = 10.0) -> List[Comparison]:
    """``n`` comparisons of two candidate responses with different gold
    scores ``g_a != g_b``, labelled by an annotator who prefers ``a`` with
    probability ``sigmoid(beta * (g_a - g_b))`` (Bradley-Terry): ``beta=0``
    is a coin flip, a large ``beta`` agrees with the gold judge."""
    _check_count("n", n, 0)
    _check_beta(beta)
    rng = random.Random(seed)
    comparisons = []
    for _ in range(n):
        prompt = _random_prompt(rng)
        a = _candidate(prompt, rng)
        b = _candidate(prompt, rng)
        while gold_score(prompt, b) == gold_score(prompt, a):
            b = _candidate(prompt, rng)
        prefer_a = rng.random() < _sigmoid(beta * (gold_score(prompt, a) - gold_score(prompt, b)))
        comparisons.append(Comparison(prompt, a, b) if prefer_a else Comparison(prompt, b, a))
    return comparisons


def make_rankings(n: int, k: int, seed: int, beta: float = 10.0) -> List[Ranking]:
    """``n`` rankings of ``k`` distinct candidate responses, ordered by a
    Plackett-Luce annotator: each next place goes to a remaining response
    with probability proportional to ``exp(beta * gold_score)``."""
    _check_count("n", n, 0)
    _check_count("k", k, 2)
    _check_beta(beta)
    rng = random.Random(seed)
    rankings = []
    for _ in range(n):
        prompt = _random_prompt(rng)
        candidates = []
        while len(candidates) < k:
            candidate = _candidate(prompt, rng)
            if candidate not in candidates:
                candidates.append(candidate)
        order = _plackett_luce([gold_score(prompt, c) for c in candidates], beta, rng)
        rankings.append(Ranking(prompt, [candidates[i] for i in order]))
    return rankings


def _plackett_luce(scores: List[float], beta: float, rng: random.Random) -> List[int]:
    """Indices of ``scores``, first place first, each place drawn from the
    rest with probability proportional to ``exp(beta * score)``."""
    remaining = list(range(len(scores)))
    order = []
    while remaining:
        top = max(scores[i] for i in remaining)
        weights = [math.exp(beta * (scores[i] - top)) for i in remaining]
        pick = rng.random() * sum(weights)
        j = 0
        while j < len(weights) - 1 and pick >= weights[j]:
            pick -= weights[j]
            j += 1
        order.append(remaining.pop(j))
    return order
