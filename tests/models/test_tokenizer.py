"""rlhf_engine.models.tokenizer.byte_tokenizer: lossless round trips,
vocabulary size, determinism (in and across processes), save/load, left
padding, special tokens."""
import hashlib
import random
import subprocess
import sys

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from rlhf_engine.models import tokenizer as tokenizer_module
from rlhf_engine.models.tokenizer import DEFAULT_CORPUS, SPECIAL_TOKENS, byte_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "word , spaced . punctuation ' s n't",  # what clean_up_tokenization_spaces would rewrite
    "Grüße, naïve café — ½ × ∑ ≠ ∞",
    "日本語のテキスト、中文文本, 한국어",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "\x00\x01\x7f control \u200b zero-width \ufeff bom",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _fingerprint(tokenizer):
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def _random_text(rng, n):
    """Random code points from every plane (no surrogates, which UTF-8 cannot hold)."""
    chars = []
    while len(chars) < n:
        c = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                        rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= c <= 0xDFFF:
            chars.append(chr(c))
    return "".join(chars)


def test_round_trip(tok):
    rng = random.Random(0)
    texts = TEXTS + [_random_text(rng, 200) for _ in range(20)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)


def test_every_byte_is_a_token(tok):
    """The 256 byte symbols are all in the vocabulary (so no text needs an
    unknown token), each a single token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = tok.get_vocab()
    assert len(alphabet) == 256 and all(symbol in vocab for symbol in alphabet)
    assert tok.unk_token is None
    assert len({tok.encode(chr(b))[0] for b in range(128)}) == 128  # ASCII: one token per byte


def test_vocab_size():
    assert len(byte_tokenizer()) == 450
    assert len(byte_tokenizer(vocab_size=300)) == 300
    assert len(byte_tokenizer(vocab_size=259)) == 259  # specials + bytes, no merges
    # a corpus with few distinct pairs cannot reach the size: everything it has
    assert len(byte_tokenizer(["abab"], vocab_size=1000)) < 1000
    for bad in (258, 450.0, None):
        with pytest.raises(ValueError, match="vocab_size"):
            byte_tokenizer(vocab_size=bad)
    with pytest.raises(ValueError, match="corpus"):
        byte_tokenizer("a single string")


def test_corpus_decides_merges(tok):
    custom = byte_tokenizer(["zzyzx quokka " * 50], vocab_size=270)
    assert len(custom.encode("zzyzx quokka")) < len(tok.encode("zzyzx quokka"))
    assert custom.decode(custom.encode(TEXTS[4])) == TEXTS[4]
    assert len(tok.encode("The garden")) < len("The garden")  # merges from the built-in corpus


def test_deterministic(tok):
    corpus = [DEFAULT_CORPUS[:1000], "the cat sat on the mat " * 5]
    assert _fingerprint(byte_tokenizer(corpus, 300)) == _fingerprint(byte_tokenizer(iter(corpus), 300))
    assert _fingerprint(byte_tokenizer()) == _fingerprint(tok)
    # a fresh process (new hash seeds): load the module file alone, skipping the package's slow imports
    code = ("import hashlib, importlib.util, sys; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(hashlib.sha256(m.byte_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, tokenizer_module.__file__], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == _fingerprint(tok)


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("plain text")[0] not in (0, 1, 2)  # nothing added
    ids = tok.encode("answer") + [tok.eos_token_id]
    assert tok.decode(ids) == "answer<eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "answer"


def test_left_padding(tok):
    batch = tok(["a much longer prompt than the other", "short"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = int(mask[1].sum())
    assert mask[0].all() and not mask[1, :-n].any() and mask[1, -n:].all()
    assert (ids[1, :-n] == tok.pad_token_id).all()
    assert tok.decode(ids[1, -n:]) == "short"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and len(loaded) == len(tok)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.padding_side == "left"
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
