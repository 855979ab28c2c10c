"""Corpora, a deterministic split, tokenize-once caching, packing into blocks, a seeded loader.

    docs = load_corpus(None)                    # the embedded default: Python's reference text
    docs = load_corpus("notes/")                # .txt/.md files (recursive) or a .jsonl with a text field
    train_docs, val_docs = split_documents(docs, val_fraction=0.1)
    ids = tokenize_documents(train_docs, tok, cache_dir="run/cache")   # 1-d int64, eos between docs
    blocks = pack(ids, seq_len=128)             # (n_blocks, seq_len)
    loader = BlockLoader(blocks, batch_size=16, seed=0)
    batch = loader.batch(step)                  # {"input_ids", "labels"}: a pure function of (seed, step)

The loader is indexed by the step, so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .checks import check_int

__all__ = [
    "DataError",
    "load_corpus",
    "default_corpus",
    "split_documents",
    "load_split",
    "tokenize_documents",
    "pack",
    "BlockLoader",
    "unigram_perplexity",
    "eval_batches",
    "TEXT_SUFFIXES",
]

TEXT_SUFFIXES = (".txt", ".md")


class DataError(ValueError):
    """The corpus cannot be read or used as asked (the CLI prints it without a traceback)."""


def _check(name: str, value, *, min: int) -> int:
    """:func:`aam_func.checks.check_int` with its error as a :class:`DataError`."""
    try:
        return check_int(name, value, min=min)
    except ValueError as e:
        raise DataError(str(e)) from None


# ----------------------------------------------------------------------------- reading


def default_corpus() -> list[str]:
    """The embedded corpus: the topics of Python's language reference (``pydoc_data.topics``,
    shipped with CPython, ~465k characters), one document per topic, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise DataError("the embedded corpus (pydoc_data.topics) is missing from this Python; pass --data PATH") from e
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); convert it to UTF-8"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: str, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no {text_field!r} field (has: {keys}); choose one with --text-field")
        if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(record[text_field]).__name__}, not text")
        docs.append(record[text_field])
    return docs


def load_corpus(path: Optional[str | os.PathLike] = None, *, text_field: str = "text") -> list[str]:
    """Documents from ``path``: None (the embedded default), a ``.txt``/``.md`` file (one
    document), a ``.jsonl`` file (one document per line, from ``text_field``) or a folder
    (every ``.txt``/``.md``/``.jsonl`` below it, in sorted path order). Empty documents are
    dropped; an empty corpus is a :class:`DataError`."""
    if path is None:
        docs = default_corpus()
        where = "the embedded corpus"
    else:
        path = os.fspath(path)
        where = path
        if not os.path.exists(path):
            raise DataError(f"data path {path!r} does not exist")
        if os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.endswith(TEXT_SUFFIXES + (".jsonl",)) and not n.startswith(".")]
            if not files:
                raise DataError(f"folder {path!r} holds no .txt, .md or .jsonl files")
        else:
            if not path.endswith(TEXT_SUFFIXES + (".jsonl",)):
                raise DataError(f"{path!r}: expected a .txt, .md or .jsonl file or a folder")
            files = [path]
        docs = []
        for f in sorted(files):
            docs += _read_jsonl(f, text_field) if f.endswith(".jsonl") else [_read_text(f)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"the corpus at {where} is empty (no non-blank text)")
    return docs


# ----------------------------------------------------------------------------- splitting


def split_documents(docs: Sequence[str], val_fraction: float = 0.1, *, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split.

    With 10 or more documents, whole documents go to validation (a seeded permutation picks
    ``ceil(val_fraction * n)``; the split does not depend on the training seed). With fewer, each
    document's last ``val_fraction`` of characters (cut at a line break when there is one) is held
    out, so a single long file still gets a validation part.
    """
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    docs = list(docs)
    if len(docs) >= 10:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(docs), generator=g).tolist()
        n_val = max(1, math.ceil(val_fraction * len(docs)))
        val_idx = set(order[:n_val])
        return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]
    train, val = [], []
    for d in docs:
        cut = int(len(d) * (1 - val_fraction))
        nl = d.rfind("\n", 0, cut)
        if nl > len(d) // 2:
            cut = nl + 1
        train.append(d[:cut])
        val.append(d[cut:])
    return [d for d in train if d.strip()], [d for d in val if d.strip()]


def load_split(path: Optional[str | os.PathLike], text_field: str = "text",
               val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """:func:`load_corpus` then :func:`split_documents`: the training and held-out documents of a
    run (both non-empty, else a :class:`DataError`)."""
    train_docs, val_docs = split_documents(load_corpus(path, text_field=text_field), val_fraction)
    if not train_docs or not val_docs:
        raise DataError("the corpus is too small to hold out a validation part; add text")
    return train_docs, val_docs


# ----------------------------------------------------------------------------- tokenizing


def _fingerprint(docs: Sequence[str], tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.hf.backend_tokenizer.to_str().encode("utf-8") if hasattr(tokenizer.hf, "backend_tokenizer")
             else repr(tokenizer.hf.get_vocab()).encode("utf-8"))
    for d in docs:
        h.update(len(d).to_bytes(8, "little"))
        h.update(d.encode("utf-8"))
    return h.hexdigest()[:24]


def tokenize_documents(docs: Sequence[str], tokenizer, *, cache_dir: Optional[str | os.PathLike] = None) -> Tensor:
    """Token ids of all documents as one 1-d int64 stream, each document followed by eos.

    With ``cache_dir`` the stream is stored under a hash of (tokenizer, documents) and read back
    on the next call, so a corpus is tokenized once.
    """
    path = None
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), f"tokens-{_fingerprint(docs, tokenizer)}.pt")
        if os.path.exists(path):
            try:
                ids = torch.load(path, weights_only=True)
                if isinstance(ids, Tensor) and ids.dtype == torch.int64 and ids.dim() == 1:
                    return ids
            except Exception:
                pass  # a damaged cache is rebuilt
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer.encode_batch(list(docs)):
        stream += ids
        stream.append(eos)
    ids = torch.tensor(stream, dtype=torch.int64)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(ids, tmp)
        os.replace(tmp, path)
    return ids


def pack(ids: Tensor, seq_len: int, *, what: str = "corpus") -> Tensor:
    """A 1-d token stream -> (n_blocks, seq_len) consecutive blocks; the tail that does not fill a
    block is dropped. Fewer tokens than one block is a :class:`DataError`."""
    _check("seq_len", seq_len, min=2)
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"the {what} has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}; "
                        "use more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


def unigram_perplexity(train_ids: Tensor, val_ids: Tensor, vocab_size: int) -> float:
    """Perplexity on ``val_ids`` of the add-one-smoothed unigram model fitted on ``train_ids``:
    the baseline a language model must beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(torch.exp(-logp[val_ids].mean()))


# ----------------------------------------------------------------------------- loading


class BlockLoader:
    """Seeded, shuffled batches of packed blocks, as a pure function of the step.

    Epoch ``e`` visits the blocks in ``randperm(n, seed + e)`` order, ``batch_size`` at a time,
    dropping the last partial batch; ``batch(step)`` is the ``step``-th batch of that sequence.
    Batches are ``{"input_ids": (batch, seq), "labels": (batch, seq)}`` (labels are shifted
    inside the model).

    Data parallelism: with ``world_size`` processes, ``batch_size`` is the global batch and
    process ``rank`` gets rows ``[rank * b, (rank + 1) * b)`` of it (``b = batch_size //
    world_size``): the shards are disjoint, their union is the single-process batch, and the
    order does not depend on the world size (a run resumes at another one).
    """

    def __init__(self, blocks: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if blocks.dim() != 2:
            raise DataError(f"blocks must be (n_blocks, seq_len), got shape {tuple(blocks.shape)}")
        _check("batch_size", batch_size, min=1)
        if blocks.shape[0] < batch_size:
            raise DataError(f"the corpus gives {blocks.shape[0]} blocks of {blocks.shape[1]} tokens, fewer than "
                            f"one batch of {batch_size}; use more text, a smaller --batch-size or --seq-len")
        _check("world_size", world_size, min=1)
        _check("rank", rank, min=0)
        if rank >= world_size:
            raise DataError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise DataError(f"a global batch of {batch_size} rows cannot be split evenly over {world_size} processes")
        self.blocks, self.batch_size, self.seed, self.shuffle = blocks, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.batches_per_epoch = blocks.shape[0] // batch_size
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            n = self.blocks.shape[0]
            if self.shuffle:
                self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> dict[str, Tensor]:
        epoch, i = divmod(int(step), self.batches_per_epoch)
        start = i * self.batch_size + self.rank * self.local_batch_size
        idx = self._order(epoch)[start:start + self.local_batch_size]
        x = self.blocks[idx]
        return {"input_ids": x, "labels": x}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        """One epoch (epoch 0) in order; use :meth:`batch` for step-indexed access."""
        for i in range(self.batches_per_epoch):
            yield self.batch(i)


def eval_batches(blocks: Tensor, batch_size: int, max_batches: Optional[int] = None):
    """Validation blocks in order, ``batch_size`` at a time (the last batch may be smaller)."""
    n = blocks.shape[0]
    count = 0
    for start in range(0, n, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        x = blocks[start:start + batch_size]
        yield {"input_ids": x, "labels": x}
        count += 1
