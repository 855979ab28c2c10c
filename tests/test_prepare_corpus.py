"""prepare_corpus: streaming readers (.txt/.md, .jsonl, .parquet), the by-document split, EOS
between documents, shards that round-trip, idempotent reuse, atomic publication under SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aam_func import cli
from aam_func.data import (DataError, iter_documents, load_corpus, open_prepared, prepare_corpus, split_documents)
from aam_func.tokenizer import EOS_TOKEN, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(n=40):
    from pydoc_data.topics import topics

    keys = sorted(topics)[:n]
    return [f"doc {i}: " + topics[k][:1500] for i, k in enumerate(keys)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(_docs(), vocab_size=300)


def _write_mixed(root, docs):
    """docs[:5] as .txt files, the rest as one .jsonl (with a blank line and a blank record)."""
    root.mkdir(exist_ok=True)
    for i, d in enumerate(docs[:5]):
        (root / f"a{i}.txt").write_text(d, encoding="utf-8")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[5:])]
    (root / "b.jsonl").write_text("\n".join(lines[:3] + ["", json.dumps({"text": "  "})] + lines[3:]) + "\n",
                                  encoding="utf-8")
    return root


def _decode(tok, stream):
    return tok.decode(stream.read(0, stream.n_tokens).tolist(), skip_special_tokens=False)


def test_shards_round_trip_and_split(tmp_path, tok):
    docs = _docs()
    src = _write_mixed(tmp_path / "src", docs)
    assert load_corpus(src) == docs  # reading order: sorted paths, lines in order, blanks dropped
    pd = prepare_corpus(src, tmp_path / "p", tokenizer=tok, shard_tokens=500)
    train, val = split_documents(docs, 0.1)
    assert _decode(tok, pd.train) == "".join(d + EOS_TOKEN for d in train)
    assert _decode(tok, pd.val) == "".join(d + EOS_TOKEN for d in val)
    entry = pd.index["splits"]["train"]
    assert len(entry["shards"]) > 3 and all(s["tokens"] == 500 for s in entry["shards"][:-1])
    assert entry["documents"] == len(train) and pd.index["splits"]["val"]["documents"] == len(val)
    assert pd.index["dtype"] == "uint16" and pd.index["split"] == {
        "rule": "documents", "documents": len(docs), "val_fraction": 0.1, "seed": 1234}
    assert (tmp_path / "p" / "train-00000.bin").stat().st_size == 1000  # flat uint16
    # deterministic: the same inputs elsewhere give the same data (same checksum), and the split is disjoint
    again = prepare_corpus(src, tmp_path / "q", tokenizer=tok, shard_tokens=500)
    assert again.checksum == pd.checksum
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    counts = pd.counts()
    assert int(counts[0].sum()) == pd.train.n_tokens and int(counts[1].sum()) == pd.val.n_tokens


def test_small_corpus_holds_out_document_tails(tmp_path, tok):
    docs = _docs(3)
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.md").write_text(d, encoding="utf-8")
    pd = prepare_corpus(tmp_path, tmp_path / "p", tokenizer=tok, shard_tokens=10_000)
    train, val = split_documents(docs, 0.1)
    assert pd.index["split"]["rule"] == "document tails"
    assert _decode(tok, pd.train) == "".join(d + EOS_TOKEN for d in train)
    assert _decode(tok, pd.val) == "".join(d + EOS_TOKEN for d in val)


def test_parquet_reader(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(20)
    pq.write_table(pa.table({"body": docs[:12] + [None, "  "], "n": list(range(14))}), tmp_path / "a.parquet",
                   row_group_size=5)
    pq.write_table(pa.table({"body": docs[12:]}), tmp_path / "b.parquet")
    assert list(iter_documents(tmp_path, "body")) == docs
    pd = prepare_corpus(tmp_path, tmp_path / "p", tokenizer=tok, text_field="body")
    train, _ = split_documents(docs, 0.1)
    assert _decode(tok, pd.train) == "".join(d + EOS_TOKEN for d in train)
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(has: body, n\); choose one with --text-field"):
        list(iter_documents(tmp_path))
    with pytest.raises(DataError, match=r"a\.parquet: column 'n' is int64, not text"):
        list(iter_documents(tmp_path, "n"))
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable parquet file"):
        list(iter_documents(tmp_path / "c.parquet", "body"))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'aam-func\[data\]'"):
        list(iter_documents(tmp_path / "a.parquet"))


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: no 'text' field \(has: body\)"):
        list(iter_documents(tmp_path / "c.jsonl"))
    assert cli.main(["prepare", "--data", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "c.jsonl:2" in err
    assert not os.path.exists(tmp_path / "p") and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        list(iter_documents(tmp_path / "d.jsonl"))
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DataError, match=r"fifo\.txt is not a regular file"):
        list(iter_documents(tmp_path / "fifo.txt"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("some text")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="exists and is not a prepared data directory"):
        prepare_corpus(tmp_path / "notes", tmp_path / "other")
    with pytest.raises(DataError, match="partial prepared directory"):
        list(iter_documents(tmp_path / "other"))


def test_prepared_directory_is_reused_and_redone_when_inputs_change(tmp_path, tok):
    src = _write_mixed(tmp_path / "src", _docs())
    lines = []
    pd = prepare_corpus(src, tmp_path / "p", tokenizer=tok, log=lines.append)
    index_mtime = os.stat(tmp_path / "p" / "index.json").st_mtime_ns
    again = prepare_corpus(src, tmp_path / "p", tokenizer=tok, log=lines.append)
    assert "reused" in lines[-1] and again.checksum == pd.checksum
    assert os.stat(tmp_path / "p" / "index.json").st_mtime_ns == index_mtime
    (src / "a0.txt").write_text("a changed document", encoding="utf-8")
    changed = prepare_corpus(src, tmp_path / "p", tokenizer=tok, log=lines.append)
    assert "reused" not in lines[-1] and changed.checksum != pd.checksum
    assert sorted(os.listdir(tmp_path)) == ["p", "src"]  # no temporary or old directory left
    other = Tokenizer.train_bpe(_docs(), vocab_size=280)
    assert prepare_corpus(src, tmp_path / "p", tokenizer=other).index["vocab_size"] == 280  # another tokenizer: redone


def test_trained_tokenizer_is_stored_with_the_shards(tmp_path):
    pd = prepare_corpus(None, tmp_path / "p", vocab_size=300)
    tok = pd.load_tokenizer()
    assert tok.vocab_size == 300 and pd.index["eos_token_id"] == tok.eos_token_id
    assert open_prepared(tmp_path / "p", tokenizer=tok).checksum == pd.checksum
    assert pd.train.documents + pd.val.documents == len(load_corpus(None))


_KILL_SCRIPT = """
import sys
from aam_func.data import prepare_corpus
from aam_func.tokenizer import Tokenizer
prepare_corpus(sys.argv[1], sys.argv[2], tokenizer=Tokenizer.load(sys.argv[3]), shard_tokens=2000)
"""


@pytest.mark.slow
def test_killed_prepare_never_leaves_a_directory_that_training_accepts(tmp_path, tok):
    """SIGKILL at random points: the output is absent (or unusable) or complete and right."""
    src = _write_mixed(tmp_path / "src", _docs(79) * 3)
    tok.save(tmp_path / "tok")
    expected = prepare_corpus(src, tmp_path / "expected", tokenizer=tok, shard_tokens=2000)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(0)
    outcomes = []
    for _ in range(8):
        if out.exists():  # a fresh preparation each time (else it is reused instantly)
            import shutil

            shutil.rmtree(out)
        p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(out), str(tmp_path / "tok")],
                             env=env, cwd=ROOT)
        time.sleep(rng.uniform(0.5, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        try:
            pd = open_prepared(out)
        except DataError as e:
            outcomes.append("refused")
            assert "not a prepared data directory" in str(e)
            continue
        outcomes.append("complete")
        assert pd.checksum == expected.checksum
        assert np.array_equal(pd.train.read(0, pd.train.n_tokens), expected.train.read(0, expected.train.n_tokens))
    assert "refused" in outcomes
    # the next preparation cleans the dead process's temporary directory and completes
    pd = prepare_corpus(src, out, tokenizer=tok, shard_tokens=2000)
    assert pd.checksum == expected.checksum
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("out")) == ["out"]
