"""Token streams in memory, packing into blocks, the step-indexed loader, evaluation batches and
the unigram baseline.

``BlockLoader`` and ``eval_batches`` read blocks from a ``(n_blocks, seq_len)`` tensor or from
token shards on disk (:class:`aam_func.data.shards.ShardBlocks`, memory-mapped): both are
indexed the same way, so a batch is the same pure function of (seed, step) either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..ops.attention.mods import document_ids
from .corpus import DataError, _check

__all__ = ["tokenize_documents", "pack", "unigram_perplexity", "unigram_perplexity_from_counts", "BlockLoader",
           "eval_batches"]


def tokenize_documents(docs: Sequence[str], tokenizer) -> Tensor:
    """Token ids of all documents as one 1-d int64 stream, each document followed by eos (in
    memory; a run writes token shards instead, :func:`aam_func.data.prepare_corpus`)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer.encode_batch(list(docs)):
        stream += ids
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.int64)


def pack(ids: Tensor, seq_len: int, *, what: str = "corpus") -> Tensor:
    """A 1-d token stream -> (n_blocks, seq_len) consecutive blocks; the tail that does not fill a
    block is dropped. Fewer tokens than one block is a :class:`DataError`."""
    _check("seq_len", seq_len, min=2)
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"the {what} has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}; "
                        "use more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


def unigram_perplexity_from_counts(train_counts: Tensor, val_counts: Tensor) -> float:
    """Perplexity on the held-out tokens (their count per id, ``val_counts``) of the
    add-one-smoothed unigram model fitted on the training counts: the baseline a language model
    must beat."""
    counts = train_counts.double() + 1.0
    logp = torch.log(counts / counts.sum())
    val = val_counts.double()
    return float(torch.exp(-(val * logp).sum() / val.sum()))


def unigram_perplexity(train_ids: Tensor, val_ids: Tensor, vocab_size: int) -> float:
    """:func:`unigram_perplexity_from_counts` of two token streams."""
    return unigram_perplexity_from_counts(torch.bincount(train_ids, minlength=vocab_size),
                                          torch.bincount(val_ids, minlength=vocab_size))


def _shape(blocks) -> tuple[int, int]:
    if isinstance(blocks, Tensor):
        if blocks.dim() != 2:
            raise DataError(f"blocks must be (n_blocks, seq_len), got shape {tuple(blocks.shape)}")
        return blocks.shape[0], blocks.shape[1]
    return len(blocks), blocks.seq_len


class BlockLoader:
    """Seeded, shuffled batches of packed blocks, as a pure function of the step.

    ``blocks``: a ``(n_blocks, seq_len)`` tensor or :class:`~aam_func.data.shards.ShardBlocks`
    (windows of token shards, read from disk per batch). Epoch ``e`` visits the blocks in
    ``randperm(n, seed + e)`` order, ``batch_size`` at a time, dropping the last partial batch;
    ``batch(step)`` is the ``step``-th batch of that sequence. Batches are ``{"input_ids": (batch,
    seq), "labels": (batch, seq)}`` (labels are shifted inside the model), on ``device`` when
    given; with ``eos_id`` also ``"document_ids"`` (batch, seq) for document masking.

    Data parallelism: with ``world_size`` processes, ``batch_size`` is the global batch and
    process ``rank`` gets rows ``[rank * b, (rank + 1) * b)`` of it (``b = batch_size //
    world_size``), and reads only those: the shards are disjoint, their union is the
    single-process batch, and the order does not depend on the world size (a run resumes at
    another one).
    """

    def __init__(self, blocks, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, device=None, eos_id: Optional[int] = None):
        n_blocks, seq_len = _shape(blocks)
        _check("batch_size", batch_size, min=1)
        if n_blocks < batch_size:
            raise DataError(f"the corpus gives {n_blocks} blocks of {seq_len} tokens, fewer than "
                            f"one batch of {batch_size}; use more text, a smaller --batch-size or --seq-len")
        _check("world_size", world_size, min=1)
        _check("rank", rank, min=0)
        if rank >= world_size:
            raise DataError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise DataError(f"a global batch of {batch_size} rows cannot be split evenly over {world_size} processes")
        self.blocks, self.batch_size, self.seed, self.shuffle = blocks, batch_size, seed, shuffle
        self.n_blocks, self.device = n_blocks, device
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.eos_id = _check("eos_id", eos_id, min=0) if eos_id is not None else None
        self.batches_per_epoch = n_blocks // batch_size
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = torch.randperm(self.n_blocks, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                self._perm = torch.arange(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> dict[str, Tensor]:
        epoch, i = divmod(int(step), self.batches_per_epoch)
        start = i * self.batch_size + self.rank * self.local_batch_size
        idx = self._order(epoch)[start:start + self.local_batch_size]
        x = self.blocks[idx]
        if self.device is not None:
            x = x.to(self.device)
        return _with_documents({"input_ids": x, "labels": x}, self.eos_id)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        """One epoch (epoch 0) in order; use :meth:`batch` for step-indexed access."""
        for i in range(self.batches_per_epoch):
            yield self.batch(i)


def _with_documents(batch: dict, eos_id: Optional[int]) -> dict:
    """Document masking (docs/attention.md): with an ``eos_id`` the batch also carries
    ``document_ids`` (batch, seq), the document of each token (+1 after each eos)."""
    if eos_id is not None:
        batch["document_ids"] = document_ids(batch["input_ids"], eos_id)
    return batch


def eval_batches(blocks, batch_size: int, max_batches: Optional[int] = None, *, eos_id: Optional[int] = None):
    """Validation blocks (a tensor or :class:`~aam_func.data.shards.ShardBlocks`) in order,
    ``batch_size`` at a time (the last batch may be smaller), at most ``max_batches`` of them
    (with ``document_ids`` when given ``eos_id``, as :class:`BlockLoader`)."""
    n, _ = _shape(blocks)
    count = 0
    for start in range(0, n, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        x = blocks[start:start + batch_size]
        yield _with_documents({"input_ids": x, "labels": x}, eos_id)
        count += 1
