"""A tokenizer that ships with the project: lower-cased words hashed into a fixed vocabulary.

No vocabulary file and no download: a word's id is ``2 + crc32(word) mod (vocab_size - 2)``
(crc32 is stable across processes and machines, unlike Python's ``hash``). Id 0 is padding, id 1
marks a text cut at ``max_length``. Collisions are the price of having no vocabulary; with 32k
buckets and the ~100k distinct words of a news corpus they mostly merge rare words.
Tokenization runs once on the host when the dataset is cached, never in the train step.
"""
from __future__ import annotations

import re
import zlib
from typing import Iterable

import numpy as np

__all__ = ["PAD", "TRUNCATED", "words", "word_ids", "tokenize"]

PAD, TRUNCATED = 0, 1
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str | bytes) -> list[str]:
    """Lower-cased words (letters/digits, with an apostrophe suffix such as "don't")."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD.findall(text.lower())


def word_ids(text: str | bytes, vocab_size: int) -> list[int]:
    """The ids of ``text``'s words, each in [2, vocab_size)."""
    return [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in words(text)]


def tokenize(texts: Iterable[str | bytes], vocab_size: int, max_length: int) -> np.ndarray:
    """int32 ``[N, max_length]``: each text's word ids, padded with PAD; a longer text keeps its
    first ``max_length - 1`` words followed by TRUNCATED."""
    texts = list(texts)
    out = np.full((len(texts), max_length), PAD, np.int32)
    for i, text in enumerate(texts):
        ids = word_ids(text, vocab_size)
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + [TRUNCATED]
        out[i, :len(ids)] = ids
    return out
