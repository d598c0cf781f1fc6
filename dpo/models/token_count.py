"""Exact token counts without building token ids, fast for byte-level BPE tokenizers.

A tokenizer runs normalizer -> pre-tokenizer -> model on each pre-token, so when there is no
normalizer and no added token matched in the text (fastdpo's tokenizer encodes its special tokens'
spellings as plain text), a text's token count is the sum of its pre-tokens' counts. For the GPT-2
byte-level pre-tokenizer (fastdpo's own tokenizers) the split is one regular expression, which
Python's ``re`` runs about 4x faster than the tokenizers library's Oniguruma engine, and pre-tokens
repeat (words), so their counts are cached: counting a preference row then costs a regex pass and
a few dictionary lookups instead of a full encode. Any other tokenizer gets ``len(encode(text))``.

The regex's letter, number and whitespace classes are built from ``unicodedata`` (the categories
``\\p{L}``, ``\\p{N}`` and the White_Space property the original pattern names) over the Basic
Multilingual Plane: ``re`` matches such classes with a lookup table, while classes reaching past it
are scanned range by range (3x slower). A text with a code point past U+FFFF (emoji) or one that
Python's Unicode version leaves unassigned (a newer Oniguruma may classify it) is encoded in full,
so every count stays exact; ``tests/test_audit.py`` checks the split against the tokenizer's own
on text drawn from every assigned code point.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable, Sequence

MAX_CACHED = 200_000          # pre-tokens whose counts are kept (about 20 MB); then the cache restarts
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(categories: tuple[str, ...], codes: list[str]) -> str:
    """A regex character class body holding every code point whose category starts with one of
    ``categories``, as ranges."""
    out, start = [], None
    for cp, cat in enumerate(codes + ["Cn"]):
        hit = cat.startswith(categories)
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            out.append(a if start == cp - 1 else f"{a}-{b}")
            start = None
    return "".join(out)


def _gpt2_pattern(L: str, N: str, W: str) -> re.Pattern:
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{W}{L}{N}]+|[{W}]+(?![^{W}])|[{W}]+")


@functools.cache
def _patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """GPT-2's pre-tokenizer pattern for ASCII text and for BMP text, and a finder of the code
    points those cannot split exactly (past the BMP, or unassigned in Python's Unicode)."""
    codes = [unicodedata.category(chr(cp)) for cp in range(0x10000)]
    ascii_ = _gpt2_pattern("A-Za-z", "0-9", "\t\n\x0b\x0c\r ")
    bmp = _gpt2_pattern(_char_class(("L",), codes), _char_class(("N",), codes), _WHITE_SPACE)
    outside = re.compile(f"[{_char_class(('Cn',), codes)}\U00010000-\U0010ffff]")
    return ascii_, bmp, outside


def splits_like_gpt2(hf_tokenizer) -> bool:
    """Whether a ``tokenizers.Tokenizer`` counts as the sum of its GPT-2 byte-level pre-tokens."""
    spec = json.loads(hf_tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    added = spec.get("added_tokens") or []
    # added tokens are matched in the text before pre-tokenizing, unless encoded as plain text
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and model.get("type") == "BPE"
            and not model.get("dropout") and (not added or hf_tokenizer.encode_special_tokens))


class TokenCounter:
    """``counter(texts) -> [len(encode(t)) for t in texts]``, fast when ``splits_like_gpt2``."""

    def __init__(self, encode: Callable[[str], list[int]],
                 encode_batch: Callable[[list[str]], list[list[int]]], hf_tokenizer):
        self._encode, self._encode_batch = encode, encode_batch
        self.fast = splits_like_gpt2(hf_tokenizer)
        self._cache: dict[str, int] = {}

    def __call__(self, texts: Sequence[str]) -> list[int]:
        if not self.fast:
            return [len(ids) for ids in self._encode_batch(list(texts))]
        ascii_, bmp, outside = _patterns()
        cache, out = self._cache, []
        for text in texts:
            if text.isascii():
                words = ascii_.findall(text)
            elif outside.search(text):
                out.append(len(self._encode(text)))
                continue
            else:
                words = bmp.findall(text)
            try:
                out.append(sum(map(cache.__getitem__, words)))
            except KeyError:
                if len(cache) > MAX_CACHED:
                    cache.clear()
                for w in words:
                    if w not in cache:
                        cache[w] = len(self._encode(w))
                out.append(sum(map(cache.__getitem__, words)))
        return out
