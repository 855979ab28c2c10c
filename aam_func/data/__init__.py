"""Corpora, the held-out split, token shards on disk, packing into blocks, a seeded loader.

    pd = prepare_corpus("corpus.jsonl", "prepared/", tokenizer=tok)   # streamed, tokenized, sharded (once)
    pd = open_prepared("prepared/")                 # checked: index checksum, shard sizes and sha256
    blocks = ShardBlocks(pd.train, seq_len=128)     # memory-mapped blocks of the training stream
    loader = BlockLoader(blocks, batch_size=16, seed=0)
    batch = loader.batch(step)                      # {"input_ids", "labels"}: a pure function of (seed, step)

    docs = load_corpus(None)                        # in memory: the embedded default (Python's reference text)
    train_docs, val_docs = split_documents(docs, val_fraction=0.1)
    blocks = pack(tokenize_documents(train_docs, tok), seq_len=128)    # (n_blocks, seq_len) tensor

The loader is indexed by the step, so a resumed run reads exactly the batches it would have read.
Modules: :mod:`.corpus` (reading, the split), :mod:`.shards` (the on-disk format),
:mod:`.prepare` (writing it), :mod:`.loading` (blocks, loader, evaluation batches); docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .corpus import (CORPUS_SUFFIXES, TEXT_SUFFIXES, DataError, corpus_files, default_corpus, iter_documents,
                     load_corpus, load_split, split_documents, split_indices)
from .loading import (BlockLoader, eval_batches, pack, tokenize_documents, unigram_perplexity,
                      unigram_perplexity_from_counts)
from .prepare import DEFAULT_SHARD_TOKENS, prepare_corpus
from .shards import PreparedData, ShardBlocks, TokenStream, is_prepared_dir, open_prepared, tokenizer_hash

__all__ = [
    "DataError", "load_corpus", "default_corpus", "iter_documents", "corpus_files", "split_documents",
    "split_indices", "load_split", "tokenize_documents", "pack", "BlockLoader", "unigram_perplexity",
    "unigram_perplexity_from_counts", "eval_batches", "TEXT_SUFFIXES", "CORPUS_SUFFIXES", "prepare_corpus",
    "open_prepared", "is_prepared_dir", "PreparedData", "TokenStream", "ShardBlocks", "tokenizer_hash",
    "DEFAULT_SHARD_TOKENS", "DEFAULT_EVAL_BATCHES", "TrainingData", "training_data",
]

DEFAULT_EVAL_BATCHES = 50  # evaluation batches when none are asked for: a fixed, bounded held-out set


@dataclass(frozen=True)
class TrainingData:
    """What a training run reads from a prepared directory: the step-indexed ``loader`` over the
    training split, the fixed evaluation blocks ``val_blocks`` (a tensor on the device), the
    unigram ``baseline`` perplexity and the splits' token counts."""

    loader: BlockLoader
    val_blocks: object
    baseline: float
    train_tokens: int
    val_tokens: int


def training_data(path: str, *, seq_len: int, batch_rows: int, eval_rows: int, seed: int, rank: int = 0,
                  world_size: int = 1, device=None, verify: bool = False, checksum=None) -> TrainingData:
    """The prepared directory ``path`` as a run reads it: blocks of ``seq_len`` tokens, global
    batches of ``batch_rows`` (this rank reads its share), and at most ``eval_rows`` held-out
    blocks spread evenly over the held-out split (all of them when fewer). ``checksum``: the
    data's that rank 0 prepared (another process may see another filesystem)."""
    pd = open_prepared(path, verify=verify)
    if checksum is not None and pd.checksum != checksum:
        raise DataError(f"{path}: the prepared data here has checksum {pd.checksum[:16]}, not {checksum[:16]} as on "
                        "rank 0; every process must see the same prepared directory")
    train = ShardBlocks(pd.train, seq_len, what="training split")
    val = ShardBlocks(pd.val, seq_len, what="validation split").spread(eval_rows)
    counts = pd.counts()
    return TrainingData(
        loader=BlockLoader(train, batch_rows, seed=seed, rank=rank, world_size=world_size, device=device),
        val_blocks=val[:].to(device) if device is not None else val[:],
        baseline=unigram_perplexity_from_counts(counts[0], counts[1]),
        train_tokens=pd.train.n_tokens, val_tokens=pd.val.n_tokens)
