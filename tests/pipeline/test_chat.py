"""Conversations and chat templates: the tokens and masks each stage sees.

The references are written out by hand from the template's text (a small
ChatML-style template on the project's byte-level tokenizer), not produced
by the encoder under test; then every command runs on a dataset folder of
conversations and the batches its trainer sees are checked."""
import json

import pytest
import torch

from rlhf_engine.models.prompts import PLAIN_SEPARATOR, encode_conversation, encode_prompt
from rlhf_engine.pipeline import data as data_module
from rlhf_engine.pipeline.data import Comparison, Demonstration, encode_pair, encode_record
from rlhf_engine.pipeline.sources import load_records
from tests.pipeline.conftest import write_model_folders

datasets = pytest.importorskip("datasets")

# ChatML-like: "<|role|>\n{content}" then, for the assistant, the EOS; a newline after every message.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
            "{% endif %}")
USER, ASSISTANT = "user", "assistant"
CONVERSATION = [{"role": USER, "content": "hi there"}, {"role": ASSISTANT, "content": "hello you"},
                {"role": USER, "content": "and then?"}, {"role": ASSISTANT, "content": "we part"}]


def _tokenizer(template=TEMPLATE):
    from rlhf_engine.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat():
    return _tokenizer()


@pytest.fixture(scope="module")
def plain():
    return _tokenizer(None)


def ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_template_renders_as_the_references_assume(chat):
    text = chat.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == "<|user|>\nhi there\n<|assistant|>\nhello you<eos>\n<|user|>\nand then?\n<|assistant|>\nwe part<eos>\n"


def test_two_turn_sft_trains_on_the_assistant_turns_only(chat):
    example = encode_record(chat, Demonstration(CONVERSATION[:1], CONVERSATION[1:]))
    turn_1, between, turn_2 = (ids(chat, "hello you<eos>"), ids(chat, "\n<|user|>\nand then?\n<|assistant|>\n"),
                               ids(chat, "we part<eos>"))
    assert example.prompt_ids == ids(chat, "<|user|>\nhi there\n<|assistant|>\n")
    assert example.responses == [turn_1 + between + turn_2]
    assert example.masks == [[True] * len(turn_1) + [False] * len(between) + [True] * len(turn_2)]
    assert turn_1[-1] == turn_2[-1] == chat.eos_token_id


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_sft_batch_targets_are_the_assistant_tokens(chat, packed):
    """What the SFT loss reads: ``response_mask`` of the collated batch, a
    two-turn conversation beside a string demonstration."""
    from rlhf_engine.pipeline.sft import collate_examples

    examples = [encode_record(chat, Demonstration(CONVERSATION[:1], CONVERSATION[1:])),
                encode_record(chat, Demonstration("a question", "an answer"))]
    batch = collate_examples(examples, chat.pad_token_id, packed)
    expected = [ids(chat, "hello you<eos>") + ids(chat, "we part<eos>"), ids(chat, "an answer") + [chat.eos_token_id]]
    rows = [batch.input_ids[0][batch.response_mask[0]].tolist()] if packed else \
        [row[mask].tolist() for row, mask in zip(batch.input_ids, batch.response_mask)]
    assert rows == ([expected[0] + expected[1]] if packed else expected)
    assert batch.attention_mask is None if packed else batch.attention_mask.sum().item() == sum(batch.row_lengths)


def test_truncation_keeps_the_masks_aligned(chat):
    example = encode_record(chat, Demonstration(CONVERSATION[:1], CONVERSATION[1:]))
    limit = len(example.prompt_ids) + len(example.responses[0]) - 3
    (fitted,), report = data_module.fit_examples([example], limit, "truncate")
    assert report.truncated == 1
    assert fitted.masks[0] == example.masks[0][:len(fitted.responses[0])]


def test_plain_format_without_a_template(plain):
    """A tokenizer without a template: the plain format, turn by turn."""
    example = encode_record(plain, Demonstration(CONVERSATION[:1], CONVERSATION[1:]))
    eos = plain.eos_token_id
    assert example.prompt_ids == [plain.bos_token_id] + ids(plain, "hi there" + PLAIN_SEPARATOR)
    turn_1, between, turn_2 = ids(plain, "hello you") + [eos], ids(plain, "and then?\nAnswer:\n"), \
        ids(plain, "we part") + [eos]
    assert example.responses == [turn_1 + between + turn_2]
    assert example.masks == [[True] * len(turn_1) + [False] * len(between) + [True] * len(turn_2)]
    # a system message and the user's: their contents on lines, then the separator
    prompt = [{"role": "system", "content": "be brief"}, {"role": USER, "content": "q"}]
    assert encode_prompt(plain, prompt) == [plain.bos_token_id] + ids(plain, "be brief\nq" + PLAIN_SEPARATOR)


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_a_single_turn_conversation_encodes_as_its_strings(which, chat, plain):
    tok = {"chat": chat, "plain": plain}[which]
    conversation = encode_record(tok, Demonstration([{"role": USER, "content": "q?"}],
                                                    [{"role": ASSISTANT, "content": "yes"}]))
    strings = encode_record(tok, Demonstration("q?", "yes"))
    assert (conversation.prompt_ids, conversation.responses, conversation.masks) == \
        (strings.prompt_ids, strings.responses, None)


def test_ppo_prompts_end_with_the_generation_prompt(chat):
    prompt = CONVERSATION[:3]
    expected = ids(chat, "<|user|>\nhi there\n<|assistant|>\nhello you<eos>\n<|user|>\nand then?\n<|assistant|>\n")
    assert encode_prompt(chat, prompt) == expected
    assert expected[-len(ids(chat, "<|assistant|>\n")):] == ids(chat, "<|assistant|>\n")
    with pytest.raises(ValueError, match="must not end with an assistant message"):
        encode_prompt(chat, CONVERSATION[:2])


def test_the_reward_model_scores_the_rendered_conversation(chat):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_engine.pipeline.evaluate import judge_reward_model
    from rlhf_engine.pipeline.reward import score_rows

    record = Comparison(CONVERSATION[:3], [{"role": ASSISTANT, "content": "good"}],
                        [{"role": ASSISTANT, "content": "bad"}])
    example = encode_record(chat, record)
    prompt = ids(chat, "<|user|>\nhi there\n<|assistant|>\nhello you<eos>\n<|user|>\nand then?\n<|assistant|>\n")
    assert example.prompt_ids == prompt
    assert example.responses == [ids(chat, "good<eos>"), ids(chat, "bad<eos>")]
    # a judge given the text of a response scores the same tokens
    assert encode_pair(chat, CONVERSATION[:3], "good") == (prompt, ids(chat, "good<eos>"))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(chat), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=chat.pad_token_id)).eval()
    scores = judge_reward_model(model, chat, [CONVERSATION[:3]] * 2, ["good", "bad"])
    with torch.no_grad():
        reference = score_rows(model, [(prompt, example.responses[0]), (prompt, example.responses[1])],
                               chat.pad_token_id).tolist()
    assert scores == pytest.approx(reference, abs=0, rel=0)


def test_hh_conversations_split_at_the_right_token(tmp_path, chat):
    """Implicit prompts: shared messages, split before the last assistant turn."""
    rejected = CONVERSATION[:3] + [{"role": ASSISTANT, "content": "we stay"}]
    path = tmp_path / "hh.parquet"
    datasets.Dataset.from_list([{"chosen": CONVERSATION, "rejected": rejected}]).to_parquet(str(path))
    (record,) = load_records(path, "comparisons")
    example = encode_record(chat, record)
    prompt = "<|user|>\nhi there\n<|assistant|>\nhello you<eos>\n<|user|>\nand then?\n<|assistant|>\n"
    assert example.prompt_ids == ids(chat, prompt)
    assert example.responses == [ids(chat, "we part<eos>"), ids(chat, "we stay<eos>")]


def test_hh_strings_split_after_the_last_assistant_marker(tmp_path, plain):
    chosen = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: We part."
    rejected = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: We stay."
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    (record,) = load_records(path, "comparisons")
    example = encode_record(plain, record)
    prompt = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant:"
    assert example.prompt_ids == [plain.bos_token_id] + ids(plain, prompt + PLAIN_SEPARATOR)
    assert example.responses == [ids(plain, " We part.") + [plain.eos_token_id],
                                 ids(plain, " We stay.") + [plain.eos_token_id]]


def test_a_template_without_eos_gets_it_on_the_last_turn_only():
    tok = _tokenizer(TEMPLATE.replace("{{ eos_token }}", "<|end|>"))
    prompt, response, mask = encode_conversation(tok, CONVERSATION, 1)
    turn_1, between, turn_2 = (ids(tok, "hello you<|end|>\n"), ids(tok, "<|user|>\nand then?\n<|assistant|>\n"),
                               ids(tok, "we part<|end|>\n") + [tok.eos_token_id])
    assert response == turn_1 + between + turn_2
    assert mask == [True] * len(turn_1) + [False] * len(between) + [True] * len(turn_2)


def test_a_template_that_is_not_prefix_stable_is_refused():
    tok = _tokenizer("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="does not render this conversation prefix by prefix"):
        encode_conversation(tok, CONVERSATION, 1)


def test_ptx_refuses_multi_turn_demonstrations(chat):
    from rlhf_engine.pipeline.ppo_stage import encode_ptx

    with pytest.raises(ValueError, match="several assistant turns"):
        encode_ptx(chat, [Demonstration(CONVERSATION[:1], CONVERSATION[1:])], 128, "truncate")


# -- every command on dataset folders of conversations ------------------------------------------

@pytest.fixture(scope="module")
def chat_workspace(tmp_path_factory):
    """Model folders whose tokenizer has the chat template, and datasets of conversations."""
    root = tmp_path_factory.mktemp("chat")
    write_model_folders(root, _tokenizer())
    words = ["red", "blue", "green", "gold"]
    conversations = [[{"role": USER, "content": f"name {w}"}, {"role": ASSISTANT, "content": w},
                      {"role": USER, "content": "again"}, {"role": ASSISTANT, "content": f"{w} {w}"}] for w in words]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": c} for c in conversations]),
                          "test": datasets.Dataset.from_list([{"messages": c} for c in conversations[:2]])}) \
        .save_to_disk(str(root / "sft"))
    datasets.Dataset.from_list([{"chosen": c, "rejected": c[:3] + [{"role": ASSISTANT, "content": "no"}]}
                                for c in conversations]).to_parquet(str(root / "hh.parquet"))
    datasets.Dataset.from_list([{"prompt": c[:1]} for c in conversations]).save_to_disk(str(root / "prompts"))
    return root


def _run(args):
    from rlhf_engine import cli

    assert cli.main(args) == 0


def test_sft_command_on_a_dataset_folder(chat_workspace, tmp_path, monkeypatch):
    from rlhf_engine.pipeline import sft

    tok = _tokenizer()
    seen = []
    original = sft.collate_examples

    def spy(examples, pad_id, packed):
        batch = original(examples, pad_id, packed)
        seen.extend(row[mask].tolist() for row, mask in zip(batch.input_ids, batch.response_mask))
        return batch

    monkeypatch.setattr(sft, "collate_examples", spy)
    _run(["sft", "--model", str(chat_workspace / "lm"), "--train_file", str(chat_workspace / "sft"),
          "--eval_file", str(chat_workspace / "sft"), "--split", "train", "--max_steps", "2", "--batch_size", "2",
          "--device", "cpu", "--out", str(tmp_path / "run")])
    expected = {w: ids(tok, f"{w}<eos>") + ids(tok, f"{w} {w}<eos>") for w in ["red", "blue", "green", "gold"]}
    assert seen and all(targets in expected.values() for targets in seen)
    assert json.loads((tmp_path / "run" / "sft" / "result.json").read_text())["train_examples"] == 4


def test_rm_command_on_hh_conversations(chat_workspace, tmp_path, monkeypatch):
    from rlhf_engine.pipeline import reward

    tok = _tokenizer()
    seen = []
    original = reward.collate_preferences

    def spy(examples, pad_id):
        seen.extend(examples)
        return original(examples, pad_id)

    monkeypatch.setattr(reward, "collate_preferences", spy)
    _run(["rm", "--model", str(chat_workspace / "lm"), "--comparisons", str(chat_workspace / "hh.parquet"),
          "--demonstrations", str(chat_workspace / "sft"), "--split", "train", "--max_steps", "2",
          "--batch_size", "2", "--eval_fraction", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert seen
    for example in seen:
        word = example.record.prompt[0]["content"].split()[1]
        prompt = f"<|user|>\nname {word}\n<|assistant|>\n{word}<eos>\n<|user|>\nagain\n<|assistant|>\n"
        assert example.prompt_ids == ids(tok, prompt)
        assert example.responses == [ids(tok, f"{word} {word}<eos>"), ids(tok, "no<eos>")]


def test_ppo_and_eval_commands_on_conversational_prompts(chat_workspace, tmp_path, monkeypatch):
    from rlhf_engine.pipeline import ppo_stage

    tok = _tokenizer()
    seen = []
    original = ppo_stage.train_ppo

    def spy(run, stage, engine, prompt_ids, *args, **kwargs):
        seen.extend(prompt_ids)
        return original(run, stage, engine, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(ppo_stage, "train_ppo", spy)
    prompts = str(chat_workspace / "prompts")
    _run(["ppo", "--policy", str(chat_workspace / "lm"), "--reward_model", str(chat_workspace / "rm"),
          "--prompts", prompts, "--eval_prompts", prompts, "--iterations", "1", "--prompts_per_iteration", "2",
          "--max_new_tokens", "2", "--mini_batch_size", "2", "--device", "cpu", "--out", str(tmp_path / "ppo")])
    assert seen == [ids(tok, f"<|user|>\nname {w}\n<|assistant|>\n") for w in ["red", "blue", "green", "gold"]]
    _run(["eval", "--policy_a", str(tmp_path / "ppo" / "ppo" / "model"), "--policy_b", str(chat_workspace / "lm"),
          "--prompts", prompts, "--judge", str(chat_workspace / "rm"), "--max_new_tokens", "2", "--device", "cpu",
          "--out", str(tmp_path / "eval")])
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "eval" / "responses.jsonl")]
    assert [row["prompt"] for row in rows] == [[{"role": USER, "content": f"name {w}"}]
                                              for w in ["red", "blue", "green", "gold"]]


def test_gold_judge_refuses_conversations(chat_workspace, tmp_path, capsys):
    from rlhf_engine import cli

    status = cli.main(["eval", "--policy_a", str(chat_workspace / "lm"), "--policy_b", str(chat_workspace / "lm"),
                       "--prompts", str(chat_workspace / "prompts"), "--out", str(tmp_path / "eval")])
    assert status == 2
    assert "row 0, field 'prompt': is a conversation" in capsys.readouterr().err
