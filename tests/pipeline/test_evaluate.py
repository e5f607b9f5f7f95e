"""Evaluation: win-rate math, decoding of sampled responses, the judges
(a reward model scores the sampled tokens themselves: the probe's reward is
the score of the rollout)."""
import functools
import math
import pickle
import random

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_engine.models.prompts import left_pad
from rlhf_engine.engine.rollout import sample
from rlhf_engine.models.scalar_heads import sequence_scores
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline import task
from rlhf_engine.pipeline.data import encode_pair, encode_prompt
from rlhf_engine.pipeline.evaluate import (SampledResponse, compare_policies, generate_responses, judge_gold,
                                           judge_reward_model, win_rate)
from rlhf_engine.pipeline.ppo_stage import PolicyProbe

PROMPTS = ["reverse: abc", "sort: fedcba", "count a: aab"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _config(vocab_size, **kw):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, **kw)


def constant_lm(vocab_size, token_id):
    """A causal LM that puts (almost) all probability on ``token_id`` at every step."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(vocab_size))
    head = nn.Linear(32, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[token_id] = 30.0
    model.set_output_embeddings(head)
    return model


def test_win_rate_counts_ties_as_half():
    result = win_rate([3, 1, 2, 2], [1, 2, 2, 0])
    assert (result.wins, result.ties, result.losses, result.n) == (2, 1, 1, 4)
    assert result.rate == 2.5 / 4
    assert win_rate([1.0], [1.0]).rate == 0.5
    assert win_rate([0, 0], [1, 1]).rate == 0.0


def test_win_rate_interval_is_the_wilson_score_interval():
    # 7 of 10: the Wilson 95% interval is [0.3968, 0.8922] (4 decimals)
    result = win_rate([1] * 7 + [0] * 3, [0] * 7 + [1] * 3)
    assert result.rate == 0.7
    assert (round(result.low, 4), round(result.high, 4)) == (0.3968, 0.8922)
    # independent formula, with ties: the tie-adjusted rate over n
    result = win_rate([1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 1, 1])
    p, n, z = 3 / 6, 6, 1.959963984540054
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (result.low, result.high) == pytest.approx((center - half, center + half), abs=1e-12)


def test_win_rate_interval_contains_the_rate_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000):
        result = win_rate([1] * (7 * n // 10) + [0] * (3 * n // 10), [0] * (7 * n // 10) + [1] * (3 * n // 10))
        assert result.low < result.rate < result.high
        widths.append(result.high - result.low)
    assert widths[0] > widths[1] > widths[2]
    everything = win_rate([1] * 5, [0] * 5)
    assert everything.rate == 1.0 and everything.high == 1.0 and everything.low < 1.0


def test_win_rate_validates():
    with pytest.raises(ValueError, match="scores_b has 1 entries"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        win_rate([], [])
    with pytest.raises(ValueError, match="finite"):
        win_rate([float("nan")], [1.0])


def test_generate_responses_from_an_eos_only_model_are_empty(tok):
    model = constant_lm(len(tok), tok.eos_token_id)
    assert generate_responses(model, tok, PROMPTS, max_new_tokens=5, temperature=1.0, seed=0,
                              batch_size=2) == ["", "", ""]


def test_generate_responses_decodes_until_max_new_tokens(tok):
    x = tok.convert_tokens_to_ids("x")
    model = constant_lm(len(tok), x)
    assert generate_responses(model, tok, PROMPTS, max_new_tokens=4, temperature=0.0, seed=0,
                              batch_size=2) == ["xxxx"] * 3


def test_generate_responses_is_seeded_and_batch_independent_when_greedy(tok):
    torch.manual_seed(1)
    model = LlamaForCausalLM(_config(len(tok)))
    kwargs = dict(max_new_tokens=6, temperature=1.0, batch_size=2)
    assert generate_responses(model, tok, PROMPTS, seed=3, **kwargs) == \
        generate_responses(model, tok, PROMPTS, seed=3, **kwargs)
    greedy = dict(max_new_tokens=6, temperature=0.0, seed=0)
    assert generate_responses(model, tok, PROMPTS, batch_size=1, **greedy) == \
        generate_responses(model, tok, PROMPTS, batch_size=3, **greedy)


def test_judges(tok):
    responses = ["cba", "abcdef", "7"]
    assert judge_gold(PROMPTS, responses) == [task.gold_score(p, r) for p, r in zip(PROMPTS, responses)]
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(_config(len(tok), num_labels=1, pad_token_id=0))
    scores = judge_reward_model(rm, tok, PROMPTS, responses, batch_size=2)
    for prompt, response, score in zip(PROMPTS, responses, scores):
        ids = torch.tensor([sum(encode_pair(tok, prompt, response), [])])
        assert score == pytest.approx(sequence_scores(rm, ids, torch.ones_like(ids)).item(), abs=1e-5)
    with pytest.raises(ValueError, match="responses has 2 entries for 3 prompts"):
        judge_gold(PROMPTS, responses[:2])


def test_compare_policies(tok):
    eos_only = constant_lm(len(tok), tok.eos_token_id)
    a_only = constant_lm(len(tok), tok.convert_tokens_to_ids("a"))
    prompts = ["count a: aab", "reverse: aaa", "sort: bca"]  # gold: "2", "aaa", "abc"
    result = compare_policies(a_only, eos_only, tok, prompts, judge_gold, max_new_tokens=3, temperature=0.0)
    assert result.responses_a == ["aaa"] * 3 and result.responses_b == [""] * 3
    assert result.scores_a == pytest.approx([0.0, 1.0, 1 / 3]) and result.scores_b == [0.0, 0.0, 0.0]
    assert result.win_rate.rate == 2.5 / 3
    rm = LlamaForSequenceClassification(_config(len(tok), num_labels=1, pad_token_id=0))
    same = compare_policies(a_only, a_only, tok, prompts, functools.partial(judge_reward_model, rm, tok),
                            max_new_tokens=3)
    assert same.win_rate.ties == 3 and same.win_rate.rate == 0.5


def eos_prone_lm(vocab_size, eos_id, p_eos=0.25):
    """A causal LM that samples EOS with probability ``p_eos`` at each step, any other token uniformly."""
    model = constant_lm(vocab_size, eos_id)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.bias.zero_()
        head.bias[eos_id] = math.log(p_eos / (1 - p_eos) * (vocab_size - 1))
    return model


def scored_rm(vocab_size, seed=0):
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(_config(vocab_size, num_labels=1, pad_token_id=0)).eval()
    with torch.no_grad():
        rm.score.weight.mul_(50.0)  # scores that differ visibly between sequences
    return rm


def test_probe_reward_is_the_mean_score_of_the_sampled_rollout(tok):
    policy, rm = eos_prone_lm(len(tok), tok.eos_token_id), scored_rm(len(tok))
    prompts = ["reverse: abc", "sort: fedcba", "count a: aab", "upper: face", "sort: ba", "reverse: dcbafe"]
    probe = PolicyProbe(tok, prompts, {"reward": functools.partial(judge_reward_model, rm, tok, batch_size=3)},
                        max_new_tokens=6, temperature=1.0, seed=5, batch_size=3)
    reward = probe(policy)["probe/reward"]
    # independently: the same draws (each batch's seed from random.Random(seed)), scored as the engine scores them
    seeds, scores, finished = random.Random(5), [], []
    for batch in (prompts[:3], prompts[3:]):
        ids, mask = left_pad([encode_prompt(tok, p) for p in batch], tok.pad_token_id)
        generator = torch.Generator().manual_seed(seeds.getrandbits(63))
        rollout = sample(policy, ids, mask, probe.params, generator=generator)
        with torch.no_grad():
            scores += sequence_scores(rm, rollout.sequences, rollout.attention_mask, rollout.position_ids).tolist()
        finished += rollout.finished.tolist()
    assert any(finished) and not all(finished)  # EOS-ended and cut responses both
    assert reward == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    # the text, re-encoded with an EOS appended to every response, would have scored otherwise
    responses, _ = probe.sample(policy)
    as_text = judge_reward_model(rm, tok, prompts, [str(r) for r in responses], batch_size=3)
    assert abs(sum(as_text) / len(as_text) - reward) > 1e-3


def test_sampled_responses_carry_their_tokens(tok):
    policy = eos_prone_lm(len(tok), tok.eos_token_id)
    responses = generate_responses(policy, tok, PROMPTS, max_new_tokens=6, seed=1, batch_size=2)
    for prompt, response in zip(PROMPTS, responses):
        assert isinstance(response, SampledResponse) and response.prompt_ids == tuple(encode_prompt(tok, prompt))
        eos = tok.eos_token_id
        assert eos not in response.response_ids[:-1] and (len(response.response_ids) == 6 or
                                                           response.response_ids[-1] == eos)
    assert pickle.loads(pickle.dumps(responses)) == responses  # gathered over the ranks
    assert [r.response_ids for r in pickle.loads(pickle.dumps(responses))] == [r.response_ids for r in responses]


def test_a_judge_with_another_tokenizer_scores_the_text(tok):
    other = byte_tokenizer(["reverse: sort: count a: upper: \nAnswer:\n"] * 20, 300)
    assert other.get_vocab() != tok.get_vocab()
    responses = generate_responses(eos_prone_lm(len(tok), tok.eos_token_id), tok, PROMPTS, max_new_tokens=6, seed=1)
    rm = scored_rm(len(other))
    texts = [str(r) for r in responses]
    assert judge_reward_model(rm, other, PROMPTS, responses) == judge_reward_model(rm, other, PROMPTS, texts)
