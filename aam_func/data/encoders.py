"""Encoding documents for ``prepare``: the project's tokenizer (Hugging Face ``tokenizers``), or
the same byte-level BPE run by ``tiktoken`` when, and only when, that gives the same ids.

    enc = batch_encoder(tokenizer, threads=2)      # TiktokenEncoder, or HFEncoder (and why)
    arrays = enc.encode(texts)                     # one uint32 array of ids per text
    enc.name, enc.reason

The tokenizer is the contract (training, evaluation and generation encode with it), so tiktoken
is used only for a tokenizer whose definition (``tokenizer.json``) is a byte-level BPE that
tiktoken computes identically (:func:`tiktoken_ranks` says why not otherwise):

- no normalizer; the pre-tokenizer is ``ByteLevel(add_prefix_space=False, use_regex=True)``,
  alone or after ``Split(Regex("\\S{256}"), "isolated")`` (the project's :meth:`Tokenizer.train_bpe`);
  the GPT-2 pattern below is then tiktoken's splitting pattern;
- a plain BPE model (no dropout, prefixes, suffixes, byte fallback or ``ignore_merges``) whose
  vocabulary is the eos/added tokens, the 256 byte symbols and one token per merge, the merges'
  ids increasing in merge order (tiktoken's rank of a token is its id and its merge priority),
  and every token encoding to itself (then a pair of adjacent tokens that concatenate to a
  token is that token's merge, so tiktoken's and the BPE's merges agree: docs/data.md);
- added tokens special, matched as written (no strip, single-word or normalization), none a
  prefix of another; tiktoken matches them in the text as the tokenizer does.

Two cases tiktoken's pattern cannot express are done exactly here: a document with a run of 256
or more non-space characters (the ``Split`` cuts it first: such a document is cut the same way
in Python, its pieces encoded by tiktoken), and a document tiktoken's regex gives up on (a very
long run of whitespace exhausts its backtracking stack): encoded by the tokenizer itself.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

__all__ = ["GPT2_PATTERN", "WHITESPACE", "batch_encoder", "tiktoken_ranks", "HFEncoder", "TiktokenEncoder",
           "byte_symbols"]

# the pattern of tokenizers' ByteLevel pre-tokenizer (use_regex=True)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# \s of the tokenizer's regex engine (Oniguruma: 0009-000D, 0085, Zs, Zl, Zp): the Unicode
# White_Space characters; tests/test_encoders.py checks it against the engine code point by code point
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000"
MAX_WORD_PATTERN = r"\S{256}"  # the Split of Tokenizer.train_bpe (MAX_WORD)
_MAX_WORD = 256
_LONG_RUN = re.compile(f"[^{re.escape(WHITESPACE)}]{{{_MAX_WORD}}}")
_ASCII_WS = np.zeros(256, dtype=bool)
_ASCII_WS[[9, 10, 11, 12, 13, 32]] = True


def byte_symbols() -> dict[str, int]:
    """The byte-level BPE's alphabet: the printable character standing for each byte (GPT-2's map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


def _pre_tokenizer_ok(pre) -> tuple[bool, bool]:
    """(convertible, with the MAX_WORD split) of a ``pre_tokenizer`` definition."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("add_prefix_space") is False and p.get("use_regex", True)

    if pre is None:
        return False, False
    if byte_level(pre):
        return True, False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and byte_level(steps[1]) and steps[0] == {
            "type": "Split", "pattern": {"Regex": MAX_WORD_PATTERN}, "behavior": "Isolated", "invert": False}:
        return True, True
    return False, False


def _model_ok(model: dict) -> Optional[str]:
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return f"its BPE has dropout {model.get('dropout')!r}"
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"its BPE sets {key}={model.get(key)!r}"
    for key in ("byte_fallback", "ignore_merges"):
        if model.get(key):
            return f"its BPE sets {key}=True"
    return None


def tiktoken_ranks(hf_tokenizer) -> tuple[Optional[dict], str]:
    """``({token bytes: id}, {special: id}, with_split)`` when tiktoken encodes exactly like
    ``hf_tokenizer`` (a ``tokenizers.Tokenizer``), else ``(None, why not)``; see the module docstring."""
    spec = json.loads(hf_tokenizer.to_str())
    if spec.get("normalizer") is not None:
        return None, "it has a normalizer"
    ok, with_split = _pre_tokenizer_ok(spec.get("pre_tokenizer"))
    if not ok:
        return None, "its pre-tokenizer is not byte-level BPE's (GPT-2 pattern, no prefix space)"
    model = spec["model"]
    why = _model_ok(model)
    if why:
        return None, why
    added = spec.get("added_tokens") or []
    specials = {}
    for t in added:
        if not t.get("special") or t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"):
            return None, f"its added token {t.get('content')!r} is not a plain special token"
        specials[t["content"]] = int(t["id"])
    if any(a != b and b.startswith(a) for a in specials for b in specials):
        return None, "one of its special tokens is a prefix of another"
    return _ranks(model, specials, with_split)


def _ranks(model: dict, specials: dict, with_split: bool):
    vocab, merges = model["vocab"], model["merges"]
    symbols = byte_symbols()
    regular = {t: i for t, i in vocab.items() if t not in specials}
    if any(s not in regular for s in symbols):
        return None, "its vocabulary lacks some of the 256 byte symbols"
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    if len(regular) != 256 + len(pairs):
        return None, "its vocabulary has tokens that no merge makes"
    try:
        made = [regular[a + b] for a, b in pairs]
        parts_known = all(a in regular and b in regular for a, b in pairs)
    except KeyError:
        return None, "a merge makes a token outside its vocabulary"
    if not parts_known or len(set(made)) != len(made) or any(x >= y for x, y in zip(made, made[1:])):
        return None, "its merged tokens' ids do not increase in merge order"
    if set(regular.values()) & set(specials.values()):
        return None, "a special token shares an id with a regular one"
    try:
        ranks = {bytes(symbols[c] for c in t): i for t, i in regular.items()}
    except KeyError:
        return None, "a token holds a character outside the 256 byte symbols"
    return (ranks, specials, with_split), ""


def _tokens_encode_to_themselves(hf_tokenizer, ranks: dict) -> bool:
    """Every merged token, encoded by the BPE model alone, is itself (the condition under which
    tiktoken's and the BPE's merges coincide: docs/data.md)."""
    model = hf_tokenizer.model
    symbols = {b: c for c, b in byte_symbols().items()}
    for token, i in ranks.items():
        if len(token) > 1:
            out = model.tokenize("".join(symbols[b] for b in token))
            if len(out) != 1 or out[0].id != i:
                return False
    return True


class HFEncoder:
    """The tokenizer's own batch encoding (its Rust threads, one per core)."""

    name = "tokenizers"

    def __init__(self, tokenizer, reason: str = ""):
        backend = tokenizer.hf.backend_tokenizer
        # the ids only: encode_batch_fast (tokenizers >= 0.21) skips the offsets
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.reason, self.threads = reason, 1

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._encode(texts, add_special_tokens=False)]


class TiktokenEncoder:
    """tiktoken with the tokenizer's ranks (:func:`tiktoken_ranks`); ``encode`` is thread-safe
    and releases the GIL while encoding, so ``threads`` batches run on ``threads`` cores."""

    name = "tiktoken"

    def __init__(self, tokenizer, ranks: dict, specials: dict, with_split: bool, threads: int):
        import tiktoken

        self.enc = tiktoken.Encoding("aam_func-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.fallback = HFEncoder(tokenizer)
        self.with_split, self.threads, self.reason = with_split, threads, ""
        self._special = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self.split_docs = self.fallback_docs = 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        long_runs = self._long_runs(texts) if self.with_split else ()
        out = []
        for i, text in enumerate(texts):
            try:
                out.append(self._encode_split(text) if i in long_runs else
                           self.enc.encode_to_numpy(text, allowed_special="all"))
            except ValueError:  # "Max stack size exceeded for backtracking": the tokenizer's own encoding
                self.fallback_docs += 1
                out += self.fallback.encode([text])
        return out

    def _long_runs(self, texts: list[str]) -> set[int]:
        """Indices of the texts that may hold a run of 256 non-whitespace characters: a run of
        256 bytes without an ASCII whitespace byte (a superset: multi-byte whitespace counts as a
        non-space here), found with numpy on the batch's UTF-8 bytes."""
        sizes = [len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts]
        if max(sizes, default=0) < _MAX_WORD:
            return set()
        data = np.frombuffer("\n".join(texts).encode("utf-8", "surrogatepass"), dtype=np.uint8)
        edges = np.concatenate(([-1], np.flatnonzero(_ASCII_WS[data]), [data.size]))
        starts = edges[:-1][np.diff(edges) > _MAX_WORD] + 1
        if not starts.size:
            return set()
        doc_starts = np.cumsum([0] + [s + 1 for s in sizes[:-1]])
        return set(np.searchsorted(doc_starts, starts, side="right").astype(np.int64) - 1)

    def _encode_split(self, text: str) -> np.ndarray:
        """The tokenizer's order: special tokens first, then the cut of non-space runs into pieces
        of 256 characters, then the pattern (tiktoken) within each piece."""
        segments = self._special.split(text) if self._special else [text]
        pieces: list = []
        for k, seg in enumerate(segments):
            if k % 2:  # a special token (the capture group of the split)
                pieces.append(np.array([self.enc.encode_single_token(seg)], dtype=np.uint32))
                continue
            pos = 0
            for m in _LONG_RUN.finditer(seg):
                pieces += [self.enc.encode_to_numpy(seg[pos:m.start()], disallowed_special=()),
                           self.enc.encode_to_numpy(m.group(), disallowed_special=())]
                pos = m.end()
            pieces.append(self.enc.encode_to_numpy(seg[pos:], disallowed_special=()))
        self.split_docs += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)


def batch_encoder(tokenizer, *, threads: int = 1, engine: str = "auto"):
    """The encoder ``prepare`` uses for ``tokenizer`` (a :class:`~aam_func.tokenizer.Tokenizer`):
    tiktoken when it is installed and exact for this tokenizer (``engine="auto"``), else the
    tokenizer's own (``reason`` says why). ``engine="tokenizers"`` forces the latter;
    ``"tiktoken"`` requires the former (a ValueError saying why not)."""
    if engine not in ("auto", "tiktoken", "tokenizers"):
        raise ValueError(f"engine must be 'auto', 'tiktoken' or 'tokenizers', got {engine!r}")
    if engine == "tokenizers":
        return HFEncoder(tokenizer, "asked for")
    why = ""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        why = "tiktoken is not installed (pip install 'aam_func[data]')"
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if not why and backend is None:
        why = "the tokenizer is not a fast (Rust) tokenizer"
    if not why:
        found, why = tiktoken_ranks(backend)
        if found is not None and not _tokens_encode_to_themselves(backend, found[0]):
            found, why = None, "some of its tokens do not encode to themselves"
        if found is not None:
            return TiktokenEncoder(tokenizer, *found, threads=max(1, threads))
    if engine == "tiktoken":
        raise ValueError(f"tiktoken cannot encode exactly like this tokenizer: {why}")
    return HFEncoder(tokenizer, why)


def encode_parallel(encoder, texts: list[str], pool: Optional[ThreadPoolExecutor]):
    """``encoder.encode(texts)`` split into ``encoder.threads`` contiguous parts run on ``pool``:
    a future-like list of futures whose results concatenate in order."""
    n = encoder.threads if pool is not None else 1
    if n <= 1 or len(texts) < 2:
        return [pool.submit(encoder.encode, texts)] if pool is not None else [_Done(encoder.encode(texts))]
    # parts of about equal characters, in order
    cum = np.cumsum([len(t) for t in texts])
    cuts = [0] + [int(np.searchsorted(cum, cum[-1] * k / n)) + 1 for k in range(1, n)] + [len(texts)]
    cuts = sorted(set(min(c, len(texts)) for c in cuts))
    return [pool.submit(encoder.encode, texts[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
