"""Token shards on disk: the format a prepared corpus is stored in, and reading it back.

A prepared directory holds, per split (``train``, ``val``), flat little-endian ``uint16`` (or
``uint32`` when the vocabulary has more than 65536 ids) token files ``<split>-NNNNN.bin``: the
split's documents in corpus order, each followed by eos, cut into shards of at most
``shard_tokens`` tokens; ``counts.bin`` (uint64, (2, vocab): each id's count in train, val);
``tokenizer/`` (the tokenizer that made them); and ``index.json``, written last, which makes
the directory complete. docs/data.md describes the index; :func:`open_prepared` checks it,
each shard's size and sha256, and names the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .corpus import DataError

__all__ = ["FORMAT", "INDEX", "SPLITS", "ShardWriter", "TokenStream", "ShardBlocks", "PreparedData",
           "open_prepared", "is_prepared_dir", "index_checksum", "file_sha256", "dtype_for", "tokenizer_hash"]

FORMAT, VERSION = "aam_func.token_shards", 1
INDEX = "index.json"
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_READ_CHUNK = 1 << 22


def dtype_for(vocab_size: int) -> str:
    """``uint16`` when every id fits in 16 bits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (``tokenizer.json``'s text): equal hashes, equal ids."""
    hf = tokenizer.hf
    text = (hf.backend_tokenizer.to_str() if hasattr(hf, "backend_tokenizer")
            else json.dumps(hf.get_vocab(), sort_keys=True))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 4 MiB chunks (no memory map: the pages do not stay resident)."""
    h = hashlib.sha256()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def index_checksum(index: dict) -> str:
    """sha256 of the index's content (everything but ``sources``, which says how it was made, and
    ``checksum`` itself), in canonical JSON: the data's identity, recorded in checkpoints."""
    content = {k: v for k, v in index.items() if k not in ("sources", "checksum")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ShardWriter:
    """Appends token arrays of one split to ``<split>-NNNNN.bin`` files in ``directory``,
    starting a new shard every ``shard_tokens`` tokens; :meth:`close` gives the index entries."""

    def __init__(self, directory: str, split: str, dtype: str, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        self._file = self._hash = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.directory, name), "wb")
        self._hash, self._in_shard = hashlib.sha256(), 0
        self.shards.append({"file": name, "tokens": 0})

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append ``ids`` (already in this writer's dtype); ``documents`` ends in them."""
        self.documents += documents
        while ids.size:
            if self._file is None:
                self._open()
            part = ids[: self.shard_tokens - self._in_shard]
            data = part.astype(part.dtype.newbyteorder("<"), copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += part.size
            self.tokens += part.size
            ids = ids[part.size:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict:
        if self._file is not None:
            self._finish_shard()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TokenStream:
    """One split's shards as one memory-mapped token stream: ``read(start, stop)`` gives the
    tokens ``[start, stop)`` as int64, across shard boundaries."""

    def __init__(self, directory: str, entry: dict, dtype: str):
        self.files = [os.path.join(directory, s["file"]) for s in entry["shards"]]
        sizes = [int(s["tokens"]) for s in entry["shards"]]
        self.ends = np.cumsum(sizes, dtype=np.int64)
        self.n_tokens = int(self.ends[-1]) if sizes else 0
        self.documents = int(entry["documents"])
        self._maps = [np.memmap(f, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"), mode="r", shape=(n,))
                      if n else np.zeros(0, _DTYPES[dtype]) for f, n in zip(self.files, sizes)]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside a stream of {self.n_tokens}")
        parts = []
        i = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            first = int(self.ends[i - 1]) if i else 0
            take = min(stop, int(self.ends[i])) - start
            parts.append(self._maps[i][start - first:start - first + take])
            start += take
            i += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.n_tokens


class ShardBlocks:
    """The stream's consecutive blocks of ``seq_len`` tokens (block ``i`` is tokens ``[i*L,
    (i+1)*L)``; the tail that does not fill a block is dropped), read on demand: indexing with
    an int tensor, a list or a slice gives a ``(k, seq_len)`` int64 tensor on ``device``.
    ``rows`` restricts it to a subset of block numbers (a fixed evaluation set)."""

    def __init__(self, stream: TokenStream, seq_len: int, *, rows: Optional[Tensor] = None, device=None,
                 what: str = "corpus"):
        if seq_len < 2:
            raise DataError(f"seq_len must be an int >= 2, got {seq_len!r}")
        n = stream.n_tokens // seq_len
        if n == 0:
            raise DataError(f"the {what} has {stream.n_tokens} tokens, fewer than one block of seq_len={seq_len}; "
                            "use more text or a smaller --seq-len")
        self.stream, self.seq_len, self.device, self.rows = stream, seq_len, device, rows
        self.n_blocks = n if rows is None else len(rows)

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_blocks, self.seq_len)

    def __getitem__(self, index) -> Tensor:
        numbers = torch.arange(self.n_blocks)[index] if isinstance(index, slice) else torch.as_tensor(index)
        if self.rows is not None:
            numbers = self.rows[numbers]
        L = self.seq_len
        out = np.stack([self.stream.read(b * L, (b + 1) * L) for b in numbers.reshape(-1).tolist()]) \
            if numbers.numel() else np.zeros((0, L), np.int64)
        x = torch.from_numpy(out)
        return x if self.device is None else x.to(self.device)

    def spread(self, count: int) -> "ShardBlocks":
        """``count`` blocks spread evenly over the stream (all of them, in order, when there are
        no more than ``count``): a fixed, bounded evaluation set."""
        if count >= self.n_blocks:
            return self
        rows = torch.div(torch.arange(count) * self.n_blocks, count, rounding_mode="floor")
        return ShardBlocks(self.stream, self.seq_len, rows=rows if self.rows is None else self.rows[rows],
                           device=self.device)


@dataclass(frozen=True)
class PreparedData:
    """An opened prepared directory: its ``index`` (dict), ``checksum`` (the data's identity),
    the two splits' :class:`TokenStream` and the tokenizer directory."""

    path: str
    index: dict
    train: TokenStream
    val: TokenStream

    @property
    def checksum(self) -> str:
        return self.index["checksum"]

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, "tokenizer")

    def counts(self) -> Tensor:
        """Each id's count in (train, val): int64 (2, vocab)."""
        c = np.fromfile(os.path.join(self.path, self.index["counts"]["file"]), dtype="<u8")
        return torch.from_numpy(c.astype(np.int64)).view(2, -1)

    def load_tokenizer(self):
        """The tokenizer that made the shards, loaded when first used on text (its size and eos id
        come from the index; its hash is checked against the index then): a run on prepared data
        does not import transformers before its first step."""
        from ..tokenizer import LazyTokenizer

        def check(tok) -> None:
            if tokenizer_hash(tok) != self.index["tokenizer_hash"]:
                raise DataError(f"{self.tokenizer_dir}: not the tokenizer that made these shards (its hash differs "
                                f"from {os.path.join(self.path, INDEX)}'s); prepare the data again")

        return LazyTokenizer(self.tokenizer_dir, vocab_size=self.index["vocab_size"],
                             eos_token_id=self.index["eos_token_id"], check=check)


def is_prepared_dir(path) -> bool:
    """Whether ``path`` is a directory with an ``index.json`` (complete or not: :func:`open_prepared` checks)."""
    return path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


def _read_index(path: str) -> dict:
    index_path = os.path.join(path, INDEX)
    if not os.path.isfile(index_path):
        raise DataError(f"{path} is not a prepared data directory (no {INDEX}; a directory that a killed "
                        "`aam-func prepare` left is never complete): prepare it again")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{index_path}: not a readable index ({e}); prepare the data again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{index_path}: not an index of aam_func token shards (format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise DataError(f"{index_path}: format version {index.get('version')!r}, this aam_func reads {VERSION}; "
                        "prepare the data again")
    try:
        ok = index_checksum(index) == index["checksum"] and index["dtype"] in _DTYPES \
            and all(isinstance(index["splits"][s]["shards"], list) for s in SPLITS)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{index_path}: the index was changed after it was written (its checksum or fields do "
                        "not match); prepare the data again")
    return index


def _check_file(path: str, size: int, sha256: Optional[str], verify: bool) -> None:
    try:
        actual = os.path.getsize(path)
    except OSError:
        raise DataError(f"{path}: missing from the prepared directory; prepare the data again") from None
    if actual != size:
        raise DataError(f"{path}: {actual} bytes where the index says {size} (truncated or replaced); "
                        "prepare the data again")
    if verify and file_sha256(path) != sha256:
        raise DataError(f"{path}: contents differ from the index's sha256 (corrupted or replaced); "
                        "prepare the data again")


def open_prepared(path, *, verify: bool = True, tokenizer=None) -> PreparedData:
    """The prepared directory ``path``, checked: the index's own checksum, every file's size, and
    with ``verify`` every shard's sha256 (about 2 ms per MB); with ``tokenizer`` its hash must be
    the index's. Any difference is a one-line :class:`DataError` naming the file."""
    path = os.path.abspath(os.fspath(path))
    index = _read_index(path)
    itemsize = np.dtype(_DTYPES[index["dtype"]]).itemsize
    for split in SPLITS:
        for s in index["splits"][split]["shards"]:
            _check_file(os.path.join(path, s["file"]), int(s["tokens"]) * itemsize, s.get("sha256"), verify)
    counts = index["counts"]
    _check_file(os.path.join(path, counts["file"]), 2 * 8 * int(index["vocab_size"]), counts["sha256"], verify)
    if tokenizer is not None and tokenizer_hash(tokenizer) != index["tokenizer_hash"]:
        raise DataError(f"{os.path.join(path, INDEX)}: made with another tokenizer (hash "
                        f"{index['tokenizer_hash'][:12]}, this run's is {tokenizer_hash(tokenizer)[:12]}); "
                        "prepare the data with this tokenizer")
    return PreparedData(path, index, *(TokenStream(path, index["splits"][s], index["dtype"]) for s in SPLITS))
