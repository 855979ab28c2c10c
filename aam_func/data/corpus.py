"""Reading corpora as a stream of documents, and the deterministic by-document held-out split.

A corpus is the embedded default (``None``), one file, or a folder (every ``.txt``/``.md``/
``.jsonl``/``.parquet`` file below it, in sorted path order). Documents are read one at a time
(:func:`iter_documents`): a ``.txt``/``.md`` file is one document, a ``.jsonl`` line one
document (its ``text_field``), a ``.parquet`` row one document (its ``text_field`` column, read
in record batches through pyarrow). Blank documents are dropped, everywhere alike.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Optional

import torch

from ..checks import check_int

__all__ = ["DataError", "TEXT_SUFFIXES", "CORPUS_SUFFIXES", "SPLIT_SEED", "default_corpus", "corpus_files",
           "iter_documents", "load_corpus", "split_indices", "cut_document", "split_documents", "load_split"]

TEXT_SUFFIXES = (".txt", ".md")
CORPUS_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
SPLIT_SEED = 1234  # the held-out split's seed: it does not depend on the training seed
MIN_DOCS_FOR_DOCUMENT_SPLIT = 10


class DataError(ValueError):
    """The corpus cannot be read or used as asked (the CLI prints it without a traceback)."""


def _check(name: str, value, *, min: int) -> int:
    """:func:`aam_func.checks.check_int` with its error as a :class:`DataError`."""
    try:
        return check_int(name, value, min=min)
    except ValueError as e:
        raise DataError(str(e)) from None


# ----------------------------------------------------------------------------- sources


def default_corpus() -> list[str]:
    """The embedded corpus: the topics of Python's language reference (``pydoc_data.topics``,
    shipped with CPython, ~465k characters), one document per topic, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise DataError("the embedded corpus (pydoc_data.topics) is missing from this Python; pass --data PATH") from e
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def _check_regular(path: str) -> None:
    """A FIFO, a device (``/dev/zero``) or a socket would hang or never end: refused by name."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file (a pipe, device or socket); give a file or a folder")


def corpus_files(path: Optional[str | os.PathLike]) -> list[str]:
    """The files a corpus path names, in reading order ([] for None, the embedded corpus)."""
    if path is None:
        return []
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names)
                      if n.endswith(CORPUS_SUFFIXES) and not n.startswith(".")]
        if not files:
            hint = ""
            if any(n.endswith(".bin") for n in os.listdir(path)):
                hint = " (it holds .bin token shards but no index.json: a partial prepared directory; prepare again)"
            raise DataError(f"folder {path!r} holds no .txt, .md, .jsonl or .parquet files{hint}")
        files = sorted(files)
    else:
        if not path.endswith(CORPUS_SUFFIXES):
            raise DataError(f"{path!r}: expected a .txt, .md, .jsonl or .parquet file or a folder")
        files = [path]
    for f in files:
        _check_regular(f)
    return files


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


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: "
                                    f"{raw[e.start:e.start + 1]!r}); convert it to UTF-8") from None
                if line.strip():
                    yield _jsonl_text(path, lineno, line, text_field)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl_text(path: str, lineno: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{lineno}: no {text_field!r} field (has: {keys}); choose one with --text-field")
    if not isinstance(record[text_field], str):
        raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(record[text_field]).__name__}, not text")
    return record[text_field]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install 'aam-func[data]' (or pip install pyarrow)"
                        ) from None
    return pyarrow


def _iter_parquet(path: str, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({str(e).strip().splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (has: {', '.join(schema.names)}); "
                        "choose one with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise DataError(f"{path}: column {text_field!r} is {kind}, not text")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:  # a null is no text, like a blank document
                yield text


def iter_documents(path: Optional[str | os.PathLike], text_field: str = "text",
                   files: Optional[Sequence[str]] = None) -> Iterator[str]:
    """The non-blank documents of the corpus at ``path`` (see the module docstring), one at a
    time; ``files``: :func:`corpus_files` of ``path`` when already listed."""
    if path is None:
        yield from default_corpus()
        return
    for f in corpus_files(path) if files is None else files:
        if f.endswith(".jsonl"):
            docs = _iter_jsonl(f, text_field)
        elif f.endswith(".parquet"):
            docs = _iter_parquet(f, text_field)
        else:
            docs = iter((_read_text(f),))
        for d in docs:
            if d.strip():
                yield d


def load_corpus(path: Optional[str | os.PathLike] = None, *, text_field: str = "text") -> list[str]:
    """All documents of :func:`iter_documents` in a list (for corpora that fit in memory; a run
    prepares token shards instead, :func:`aam_func.data.prepare_corpus`). An empty corpus is a
    :class:`DataError`."""
    docs = list(iter_documents(path, text_field))
    if not docs:
        where = "the embedded corpus" if path is None else os.fspath(path)
        raise DataError(f"the corpus at {where} is empty (no non-blank text)")
    return docs


# ----------------------------------------------------------------------------- splitting


def _check_fraction(val_fraction: float) -> None:
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def split_indices(n_docs: int, val_fraction: float, seed: int = SPLIT_SEED) -> torch.Tensor:
    """The held-out mask of ``n_docs`` documents (bool, (n_docs,)): ``ceil(val_fraction * n)`` of
    them, the first of ``randperm(n_docs)`` under ``seed``. Used with 10 documents or more."""
    _check_fraction(val_fraction)
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n_docs, dtype=torch.bool)
    mask[order[:max(1, math.ceil(val_fraction * n_docs))]] = True
    return mask


def cut_document(doc: str, val_fraction: float) -> tuple[str, str]:
    """``(head, tail)`` of one document, the tail its last ``val_fraction`` of characters (cut
    at a line break when there is one in its second half). Used with fewer than 10 documents."""
    cut = int(len(doc) * (1 - val_fraction))
    nl = doc.rfind("\n", 0, cut)
    if nl > len(doc) // 2:
        cut = nl + 1
    return doc[:cut], doc[cut:]


def split_documents(docs: Sequence[str], val_fraction: float = 0.1, *, seed: int = SPLIT_SEED
                    ) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split.

    With 10 or more documents, whole documents go to validation (:func:`split_indices`; the
    split does not depend on the training seed). With fewer, each document's last
    ``val_fraction`` of characters is held out (:func:`cut_document`), so a single long file
    still gets a validation part. Blank parts are dropped.
    """
    _check_fraction(val_fraction)
    docs = list(docs)
    if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        mask = split_indices(len(docs), val_fraction, seed).tolist()
        return [d for d, v in zip(docs, mask) if not v], [d for d, v in zip(docs, mask) if v]
    parts = [cut_document(d, val_fraction) for d in docs]
    return [h for h, _ in parts if h.strip()], [t for _, t in parts if t.strip()]


def load_split(path: Optional[str | os.PathLike], text_field: str = "text",
               val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """:func:`load_corpus` then :func:`split_documents`: the training and held-out documents
    (both non-empty, else a :class:`DataError`), in memory."""
    train_docs, val_docs = split_documents(load_corpus(path, text_field=text_field), val_fraction)
    if not train_docs or not val_docs:
        raise DataError("the corpus is too small to hold out a validation part; add text")
    return train_docs, val_docs
