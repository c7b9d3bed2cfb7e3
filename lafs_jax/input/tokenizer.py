"""CLIP's text tokenizer (byte-level BPE), offline: the ids OpenAI CLIP and FaRL's text tower read.

    tok = Tokenizer();  ids, truncated = tok.tokenize(["a photo of a face"], context_length=77)

Steps, as CLIP's `simple_tokenizer.py` (and open_clip's default 'lower' cleaning) do them:
  1. clean: `ftfy.fix_text`, HTML unescape (twice), strip; runs of whitespace -> one space; lower case;
  2. split into words with CLIP's pattern (the special tokens (see SOT), English contractions, runs of letters,
     single digits, runs of other non-space characters);
  3. each word's UTF-8 bytes mapped to printable characters (GPT-2's byte -> unicode table), the last one
     marked with '</w>', then byte-pair merges applied by rank;
  4. ids = [start of text 49406] + tokens + [end of text 49407], zero-padded to `context_length`;
     a longer sequence is cut to `context_length` with its last id replaced by end of text (CLIP's
     truncation) and flagged in `truncated`.

Vocabulary: `bpe_simple_vocab_16e6.txt.gz` beside this file, byte-identical to the one in the PyPI wheel
open_clip_torch 2.32.0 (open_clip/bpe_simple_vocab_16e6.txt.gz, sha256 924691ac288e5440...6804a; MIT
licence, originally OpenAI CLIP's, MIT): 262,145 lines, a version header then the 48,894 merges of the
49,408-token vocabulary (256 bytes, 256 bytes + '</w>', the merges, the two special tokens).
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import ftfy
import numpy as np
import regex

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# the special tokens' vocabulary entries as open_clip names them; a caption containing one of these two
# strings gets the special id (open_clip's behaviour; OpenAI's tokenizer does the same for its spellings
# '<|startoftext|>' / '<|endoftext|>', which here are plain text)
SOT, EOT = "<start_of_text>", "<end_of_text>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894
_WORDS = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters: printable Latin-1 bytes map to
    themselves, the others to code points from 256 up, in byte order. The dict's order (printable
    bytes first, then the others) is the order of the first 256 vocabulary entries."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def clean(text: str) -> str:
    """ftfy fix, HTML unescape, whitespace collapsed, stripped, lower case (open_clip's 'lower')."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """CLIP's BPE over the vocabulary file `vocab_file` (see the module docstring)."""

    def __init__(self, vocab_file: str = VOCAB_FILE):
        with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_file}: expected {NUM_MERGES} merge lines of two symbols after the header")
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_map = byte_to_unicode()
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self._cache = {SOT: SOT, EOT: EOT}

    def bpe(self, word: str) -> str:
        """Space-separated BPE symbols of one byte-mapped word (the last symbol ends in '</w>')."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = " ".join(parts)
        if len(self._cache) < 1_000_000:
            self._cache[word] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without the start / end tokens."""
        ids = []
        for word in _WORDS.findall(clean(text)):
            mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
            ids += [self.encoder[s] for s in self.bpe(mapped).split(" ")]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens and padding dropped; '</w>' -> a space)."""
        inverse = {v: k for k, v in self.byte_map.items()}
        words = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, self.sot, self.eot)).split("</w>")
        return " ".join(bytearray(inverse[c] for c in w).decode("utf-8", errors="replace") for w in words).strip()

    def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [N, context_length], truncated bool [N]) of `texts` (see the module docstring)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.zeros((len(texts), context_length), np.int32)
        truncated = np.zeros(len(texts), bool)
        for n, text in enumerate(texts):
            row = [self.sot, *self.encode(text), self.eot]
            if len(row) > context_length:
                row = row[:context_length]
                row[-1] = self.eot
                truncated[n] = True
            ids[n, :len(row)] = row
        return ids, truncated


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The tokenizer over the bundled vocabulary, built once per process."""
    return Tokenizer()
