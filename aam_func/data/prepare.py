"""Preparing a corpus: stream the documents, split them, tokenize in parallel batches, write
token shards (:mod:`aam_func.data.shards`), publish the directory atomically.

    pd = prepare_corpus("corpus.jsonl", "prepared/", tokenizer=tok, log=print, progress=True)
    pd = prepare_corpus(None, "prepared/", vocab_size=4096)     # the embedded corpus, a BPE trained on it

Passes over the corpus: one counting the documents (the held-out split is a permutation of
their count), one training a BPE when no tokenizer is given (on the training documents only),
one tokenizing, batch by batch on one thread per core (tiktoken running the tokenizer's BPE when
that is exact, else the tokenizer's own batch encoding: :mod:`aam_func.data.encoders`), the next
batch read while the last is encoded. Everything is written into ``<output>.tmp-<pid>`` and
renamed to ``output`` once ``index.json`` is written, so ``output`` is complete or absent: a killed prepare leaves only a
temporary directory, removed by the next prepare. An ``output`` made from the same inputs (the
files' paths, sizes and modification times), tokenizer and settings is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Callable, Optional

import numpy as np

from ..processes import pid_alive
from .corpus import (MIN_DOCS_FOR_DOCUMENT_SPLIT, SPLIT_SEED, DataError, _check, corpus_files, cut_document,
                     default_corpus, iter_documents, split_indices)
from .encoders import batch_encoder, encode_parallel
from .shards import (FORMAT, INDEX, SPLITS, VERSION, ShardWriter, dtype_for, file_sha256, index_checksum,
                     is_prepared_dir, open_prepared, tokenizer_hash)

__all__ = ["prepare_corpus", "DEFAULT_SHARD_TOKENS"]

DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB shards of uint16
_BATCH_CHARS = 1 << 21  # characters per encode_batch call


def _fingerprint(data, files: list[str], text_field: str, val_fraction: float, tokenizer, vocab_size: int,
                 shard_tokens: int) -> dict:
    """What the prepared directory was made from: reused only when all of it is equal."""
    if data is None:
        text = "\0".join(default_corpus()).encode("utf-8")
        inputs = [["embedded:pydoc_data.topics", hashlib.sha256(text).hexdigest()]]
    else:
        inputs = [[os.path.abspath(f), st.st_size, st.st_mtime_ns] for f in files for st in (os.stat(f),)]
    tok = {"hash": tokenizer_hash(tokenizer)} if tokenizer is not None else {"train_bpe": vocab_size}
    return {"inputs": inputs, "text_field": text_field, "val_fraction": val_fraction, "tokenizer": tok,
            "shard_tokens": shard_tokens}


def _split_texts(docs: Iterator[str], n_docs: int, val_fraction: float) -> Iterator[tuple[int, str]]:
    """``(0 train | 1 val, text)`` of each document (or, with fewer than 10, each document's head
    and tail), in corpus order; blank parts dropped."""
    if n_docs >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        mask = split_indices(n_docs, val_fraction).numpy()
        for i, d in enumerate(docs):
            yield int(mask[i]), d
        return
    for d in docs:
        for which, part in enumerate(cut_document(d, val_fraction)):
            if part.strip():
                yield which, part


def _batches(pairs: Iterator[tuple[int, str]]) -> Iterator[tuple[int, list[str]]]:
    """``(split, texts)``: each split's texts in order, in lists of about ``_BATCH_CHARS`` characters."""
    batches: list[list[str]] = [[], []]
    chars = [0, 0]
    for which, text in pairs:
        batches[which].append(text)
        chars[which] += len(text)
        if chars[which] >= _BATCH_CHARS:
            yield which, batches[which]
            batches[which], chars[which] = [], 0
    for which in (0, 1):
        if batches[which]:
            yield which, batches[which]


class _Progress:
    """Documents done out of the count, tokens/s: a tqdm bar (``progress``) and/or ``log`` lines."""

    def __init__(self, total: int, progress: bool, log: Optional[Callable[[str], None]]):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="doc", desc="prepare", dynamic_ncols=True,
                        disable=not (progress and sys.stderr.isatty()))
        self.log, self.tokens, self.docs, self.t0, self.last_log = log, 0, 0, time.perf_counter(), time.perf_counter()

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(docs)
        self.bar.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
        if self.log is not None and time.perf_counter() - self.last_log > 30:
            self.last_log = time.perf_counter()
            self.log(f"prepare: {self.docs:,}/{self.bar.total:,} documents, {self.tokens:,} tokens, {rate:,.0f} tok/s")

    def close(self) -> float:
        self.bar.close()
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


def _tokenize(pairs, encoder, eos: int, writers: list[ShardWriter], counts: np.ndarray, bar: _Progress) -> None:
    """Encode each split's documents batch by batch (:mod:`.encoders`; the next batch is read
    while the last one is encoded) and append them, eos after each, to its writer."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    np_dtype = np.dtype(writers[0].dtype)
    pending: deque = deque()
    with ThreadPoolExecutor(max(encoder.threads, 1)) as pool:
        for which, texts in _batches(pairs):
            pending.append((which, len(texts), encode_parallel(encoder, texts, pool)))
            if len(pending) > 1:
                _append(*pending.popleft(), eos, np_dtype, writers, counts, bar)
        while pending:
            _append(*pending.popleft(), eos, np_dtype, writers, counts, bar)


def _append(which: int, n_texts: int, futures, eos: int, np_dtype, writers, counts, bar) -> None:
    arrays = [a for f in futures for a in f.result()]
    lengths = np.fromiter((a.size + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    ends = np.cumsum(lengths)
    ids = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np_dtype)
    for a, end, n in zip(arrays, ends.tolist(), lengths.tolist()):
        ids[end - n:end - 1] = a
    ids[ends - 1] = eos
    counts[which] += np.bincount(ids, minlength=counts.shape[1]).astype(np.uint64)
    writers[which].write(ids, documents=n_texts)
    bar.update(n_texts, ids.size)


def _clean_stale(output: str) -> None:
    """Remove ``<output>.tmp-PID`` / ``.old-PID`` left by a prepare that was killed (its PID gone)."""
    parent, base = os.path.split(output)
    for name in os.listdir(parent or "."):
        for tag in (".tmp-", ".old-"):
            if name.startswith(base + tag) and name[len(base + tag):].isdigit():
                pid = int(name[len(base + tag):])
                if pid != os.getpid() and not pid_alive(pid):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _publish(tmp: str, output: str) -> None:
    """Move the complete ``tmp`` to ``output`` (replacing an older prepared directory there)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _check_output(output: str) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"prepared data path {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not is_prepared_dir(output):
        raise DataError(f"{output} exists and is not a prepared data directory (no {INDEX}); "
                        "give an empty or new path for the prepared data")


def prepare_corpus(data, output, *, tokenizer=None, vocab_size: int = 4096, text_field: str = "text",
                   val_fraction: float = 0.1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   log: Optional[Callable[[str], None]] = None, progress: bool = False, engine: str = "auto"):
    """Prepare the corpus ``data`` (None: the embedded one; a file or folder,
    :func:`~aam_func.data.corpus_files`) into the directory ``output`` and return it opened
    (:class:`~aam_func.data.PreparedData`). ``tokenizer``: the :class:`~aam_func.tokenizer.Tokenizer`
    to use, else a byte-level BPE of ``vocab_size`` is trained on the training documents.
    ``log`` hears a line at the end (and every 30 s); ``progress`` shows a bar with tokens/s
    (on a terminal). ``engine``: ``"auto"`` encodes with tiktoken when it is installed and gives
    exactly the tokenizer's ids (:mod:`aam_func.data.encoders`), else with the tokenizer;
    ``"tokenizers"`` or ``"tiktoken"`` force one (the ids are the same either way).
    See the module docstring for reuse and atomicity."""
    _check("shard_tokens", shard_tokens, min=1)
    output = os.path.abspath(os.fspath(output))
    files = corpus_files(data)
    fp = _fingerprint(data, files, text_field, val_fraction, tokenizer, vocab_size, shard_tokens)
    _check_output(output)
    if is_prepared_dir(output):
        try:
            pd = open_prepared(output, tokenizer=tokenizer)
            if pd.index.get("sources") == fp:
                if log is not None:
                    log(f"prepared data: {output} (reused: same inputs and tokenizer)")
                return pd
        except DataError as e:  # damaged, or made with another tokenizer: prepared again
            if log is not None:
                log(f"preparing {output} again: {e}")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    _clean_stale(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        summary = _write(data, files, tmp, fp, tokenizer, vocab_size, text_field, val_fraction, shard_tokens, log,
                         progress, engine)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log is not None:
        log(f"prepared {summary} -> {output}")
    return open_prepared(output, verify=False)


def _docs(data, files, text_field):
    return iter_documents(data, text_field, files=files)


def _write(data, files, tmp, fp, tokenizer, vocab_size, text_field, val_fraction, shard_tokens, log, progress,
           engine="auto") -> str:
    """Count, split, (train a BPE,) tokenize into ``tmp``; the index is written last. Returns a summary."""
    t0 = time.perf_counter()
    n_docs = sum(1 for _ in _docs(data, files, text_field))
    if n_docs == 0:
        raise DataError(f"the corpus at {data or 'the embedded corpus'} is empty (no non-blank text)")
    if tokenizer is None:
        from ..tokenizer import Tokenizer

        texts = (t for w, t in _split_texts(_docs(data, files, text_field), n_docs, val_fraction) if w == 0)
        tokenizer = Tokenizer.train_bpe(texts, vocab_size)
        if log is not None:
            log(f"trained a byte-level BPE tokenizer ({tokenizer.vocab_size} tokens) in "
                f"{time.perf_counter() - t0:.1f}s")
    tokenizer.save(os.path.join(tmp, "tokenizer"))
    dtype = dtype_for(tokenizer.vocab_size)
    counts = np.zeros((2, tokenizer.vocab_size), dtype=np.uint64)
    bar = _Progress(n_docs, progress, log)
    try:
        encoder = batch_encoder(tokenizer, threads=len(os.sched_getaffinity(0)), engine=engine)
    except ValueError as e:
        raise DataError(f"engine={engine!r}: {e}") from None
    if log is not None:
        log(f"prepare: encoding with {encoder.name}" + (f" ({encoder.reason})" if encoder.reason else "")
            + (f" on {encoder.threads} threads" if encoder.threads > 1 else ""))
    writers = [ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS]
    try:
        _tokenize(_split_texts(_docs(data, files, text_field), n_docs, val_fraction), encoder,
                  tokenizer.eos_token_id, writers, counts, bar)
        entries = {split: w.close() for split, w in zip(SPLITS, writers)}
    except BaseException:
        for w in writers:
            w.abort()
        raise
    rate = bar.close()
    if not entries["train"]["tokens"] or not entries["val"]["tokens"]:
        raise DataError("the corpus is too small to hold out a validation part; add text")
    counts.astype("<u8").tofile(os.path.join(tmp, "counts.bin"))
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": tokenizer.vocab_size,
             "eos_token_id": tokenizer.eos_token_id, "tokenizer_hash": tokenizer_hash(tokenizer),
             "split": {"rule": "documents" if n_docs >= MIN_DOCS_FOR_DOCUMENT_SPLIT else "document tails",
                       "documents": n_docs, "val_fraction": val_fraction, "seed": SPLIT_SEED},
             "splits": entries, "counts": {"file": "counts.bin", "sha256": file_sha256(os.path.join(tmp, "counts.bin"))},
             "sources": fp}
    index["checksum"] = index_checksum(index)
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    total = entries["train"]["tokens"] + entries["val"]["tokens"]
    return f"{n_docs:,} documents, {total:,} tokens ({entries['val']['documents']:,} documents held out) " \
           f"in {time.perf_counter() - t0:.1f}s ({rate:,.0f} tok/s)"
