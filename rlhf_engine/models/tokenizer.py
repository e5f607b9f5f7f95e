"""A small byte-level BPE tokenizer trained locally (no downloads).

Every one of the 256 bytes is in the vocabulary, so any text encodes and
decodes losslessly whatever the training corpus; the corpus only decides
which merges exist. Special tokens: ``<pad>`` (id 0), ``<bos>`` (1),
``<eos>`` (2); ``encode`` adds none of them. Prompts pad on the left, the
layout the engine's batches use.

Learning the merges costs time quadratic in the length of a pre-tokenized
word, so the trainer never sees a run of more than :data:`MAX_WORD_CHARS`
non-space (or space) characters: :func:`training_texts` cuts longer runs
into pieces (a 1 MB line without a space trains in well under a second).
Ordinary text, whose words are shorter, is passed through unchanged.
"""
import re
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
_ALPHABET = pre_tokenizers.ByteLevel.alphabet()  # the 256 bytes as printable characters
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(_ALPHABET)  # the special tokens and the 256 bytes
# The longest run of non-space (or of space) characters the BPE trainer is given: a byte-level word is at most
# one such run plus a leading space, and the trainer's time grows with the square of a word's length.
MAX_WORD_CHARS = 256

# The default training text: plain English prose written for this module, so
# the default tokenizer is the same everywhere.
DEFAULT_CORPUS = """\
The garden behind the old house was quiet in the morning. A thin mist lay over the grass, and the first light
of the sun made the wet leaves shine. Birds were singing in the trees near the wall, and a small brown cat sat
on the steps, watching them with great interest. Nobody else was awake yet.

Anna opened the kitchen window and looked outside. She liked the garden best at this hour, before the noise of
the day began. She made a cup of tea, took a piece of bread with butter and honey, and went out to sit on the
bench under the apple tree. The air smelled of earth and flowers. It was going to be a warm day.

Her brother Tom came down a little later. He was still tired, because he had stayed up late reading a book about
the history of ships. He told Anna that the first boats were made from hollow logs, and that people had crossed
rivers and lakes long before anyone could write. Later, sailors learned to use the wind, and they built larger
ships with tall masts and wide sails. They followed the stars at night and the coast during the day.

"Do you think they were afraid?" Anna asked.

"Sometimes," Tom said. "The sea is very large, and storms can come quickly. But they were also curious. They
wanted to know what was on the other side of the water."

Questions and answers

Question: What is the capital of France?
Answer: The capital of France is Paris.

Question: How many days are there in a week?
Answer: There are seven days in a week.

Question: Why is the sky blue during the day?
Answer: Sunlight is scattered by the air, and blue light is scattered more than red light, so the sky looks blue.

Question: What do plants need in order to grow?
Answer: Plants need water, light, air, and nutrients from the soil.

Question: Can you write a short poem about the rain?
Answer: Soft rain on the roof, slow rain on the road; the river grows wider and carries its load.

Question: What is two plus three?
Answer: Two plus three is five.

Question: Please summarize the story in one sentence.
Answer: Two children talk in a quiet garden about the early history of boats and the courage of sailors.

Simple facts

Water freezes at zero degrees Celsius and boils at one hundred degrees Celsius at sea level. The Earth turns
once every day and travels around the Sun once every year. The Moon does not make its own light; it reflects
the light of the Sun. A year has twelve months, and most months have thirty or thirty-one days.

Good writing is clear and simple. A helpful answer should be correct, polite, and easy to understand. When a
question is not clear, it is better to ask for more information than to guess. When you do not know something,
it is honest to say so. Short sentences are often easier to read than long ones, but a good paragraph needs
both.

Numbers and lists

1. Wake up early.
2. Drink a glass of water.
3. Read for twenty minutes.
4. Walk outside for half an hour.
5. Write down three things you learned today.

The store sells apples for 2 dollars, oranges for 3 dollars, and bread for 4 dollars. If you buy two apples and
one loaf of bread, you pay 8 dollars in total. If you pay with a ten dollar note, you receive 2 dollars back.

A letter

Dear friend,

Thank you for your kind letter. I was very happy to hear that you are well and that your new work is going
better than you expected. Here the weather has been cold, but the days are getting longer, and the children
play outside every afternoon until it is dark. We hope to visit you in the summer, when the roads are dry and
the trains are running again. Please write soon and tell me about your city, your neighbours, and the small
things that make you smile.

With warm wishes,
Your friend
"""


def training_texts(corpus: Iterable[str], max_word_chars: int = MAX_WORD_CHARS) -> Iterator[str]:
    """The texts of ``corpus`` as the BPE trainer gets them: a text with a
    run of ``max_word_chars`` or more non-space (or space) characters is cut
    into pieces, each such run into pieces of at most ``max_word_chars``
    characters, so that no pre-tokenized word is longer than
    ``max_word_chars + 1`` characters. The pieces, joined, give the text
    back; a text without such a run is yielded as it is."""
    if isinstance(max_word_chars, bool) or not isinstance(max_word_chars, int) or max_word_chars < 1:
        raise ValueError(f"max_word_chars must be an int >= 1, got {max_word_chars!r}")
    long_run = re.compile(r"\S{%d}|\s{%d}" % (max_word_chars, max_word_chars))
    for text in corpus:
        if len(text) < max_word_chars:
            yield text
            continue
        start = 0
        for match in long_run.finditer(text):
            if match.start() > start:
                yield text[start:match.start()]
            yield match.group()
            start = match.end()
        if start < len(text):
            yield text[start:]


def byte_tokenizer(corpus=None, vocab_size=450):
    """A byte-level BPE tokenizer trained on ``corpus``.

    Args:
        corpus: iterable of str to learn merges from; None: :data:`DEFAULT_CORPUS`.
        vocab_size: total vocabulary (3 special tokens + 256 bytes + merges);
            reached exactly when the corpus has enough distinct merges.

    Long runs of characters are cut before training (:func:`training_texts`).

    Returns:
        a ``PreTrainedTokenizerFast`` with ``pad_token``/``bos_token``/
        ``eos_token`` set, ``padding_side="left"``; the same corpus always
        gives the same vocabulary and merges.

    Raises:
        ValueError: ``vocab_size`` cannot hold the special tokens and bytes,
            or ``corpus`` is a plain string (an iterable of texts is expected).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (special tokens + 256 bytes), "
                         f"got {vocab_size!r}")
    if isinstance(corpus, str):
        raise ValueError("corpus must be an iterable of str, not a single str (it would be read one character "
                         "at a time)")
    texts = [DEFAULT_CORPUS] if corpus is None else corpus
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=_ALPHABET, show_progress=False)
    backend.train_from_iterator(training_texts(texts), trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos,
                                   padding_side="left", clean_up_tokenization_spaces=False)
