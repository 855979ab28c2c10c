"""Corpora, split, packing and the step-indexed loader (token shards: test_shards_*.py, test_prepare_*.py)."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aam_func import data
from aam_func.data import BlockLoader, DataError, load_corpus, pack, split_documents
from aam_func.tokenizer import Tokenizer


def test_default_corpus_is_python_reference_text():
    docs = load_corpus(None)
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert any("with" in d and "context manager" in d for d in docs)
    assert docs == load_corpus(None)  # deterministic order


def test_folder_txt_md_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.md").write_text("# first file", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "from json"}) + "\n\n" + json.dumps({"text": "two"}) + "\n", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\xff\xfe")
    assert load_corpus(tmp_path) == ["# first file", "second file", "from json", "two"]
    assert load_corpus(tmp_path / "sub" / "c.jsonl") == ["from json", "two"]


def test_jsonl_text_field_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:1: no 'text' field \(has: body\)"):
        load_corpus(f)
    assert load_corpus(f, text_field="body") == ["x"]
    f.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:1: not valid JSON"):
        load_corpus(f)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8"):
        load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .md, .jsonl or .parquet"):
        load_corpus(tmp_path / "d")
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match="expected a .txt"):
        load_corpus(tmp_path / "x.csv")


@given(st.lists(st.text(min_size=1, max_size=30), min_size=10, max_size=40))
def test_split_by_documents_is_deterministic_and_disjoint(docs):
    docs = [f"{i}:{d}" for i, d in enumerate(docs)]  # distinct
    train, val = split_documents(docs, 0.2)
    assert (train, val) == split_documents(docs, 0.2)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert len(val) == -(-len(docs) * 2 // 10)


def test_split_few_documents_holds_out_each_tail():
    doc = "\n".join(f"line {i}" for i in range(100))
    train, val = split_documents([doc], 0.1)
    assert train[0] + val[0] == doc and 0 < len(val[0]) < len(doc) // 5
    assert val[0].startswith("line")  # cut at a line break


def test_pack_and_short_corpus():
    ids = torch.arange(23)
    blocks = pack(ids, 5)
    assert blocks.shape == (4, 5) and torch.equal(blocks.flatten(), ids[:20])
    with pytest.raises(DataError, match="fewer than one block"):
        pack(torch.arange(3), 5)


def test_loader_is_a_seeded_function_of_the_step():
    blocks = torch.arange(40).view(10, 4)
    a, b = BlockLoader(blocks, 3, seed=7), BlockLoader(blocks, 3, seed=7)
    assert len(a) == 3
    for step in [5, 0, 2, 9, 1]:  # any order: the batch depends only on (seed, step)
        assert torch.equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    epoch = torch.cat([a.batch(i)["input_ids"][:, 0] for i in range(3)])
    assert len(set(epoch.tolist())) == 9  # no block twice within an epoch
    other = BlockLoader(blocks, 3, seed=8)
    assert any(not torch.equal(a.batch(i)["input_ids"], other.batch(i)["input_ids"]) for i in range(3))
    assert torch.equal(a.batch(0)["labels"], a.batch(0)["input_ids"])
    with pytest.raises(DataError, match="fewer than one batch"):
        BlockLoader(blocks, 11)


def test_tokenize_documents_in_memory():
    docs = ["alpha beta gamma", "delta epsilon"] * 5
    tok = Tokenizer.train_bpe(docs, vocab_size=300)
    ids = data.tokenize_documents(docs, tok)
    assert ids.dtype == torch.int64 and (ids == tok.eos_token_id).sum() == len(docs)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "".join(d + "<|endoftext|>" for d in docs)


def test_unigram_perplexity():
    uniform = torch.arange(8).repeat(100)
    assert data.unigram_perplexity(uniform, uniform, 8) == pytest.approx(8.0, rel=1e-6)
    skewed = torch.tensor([0] * 90 + [1] * 10)
    assert data.unigram_perplexity(skewed, skewed, 2) < 2.0


def test_eval_batches_cover_all_blocks():
    blocks = torch.arange(70).view(7, 10)
    got = list(data.eval_batches(blocks, 3))
    assert [b["input_ids"].shape[0] for b in got] == [3, 3, 1]
    assert len(list(data.eval_batches(blocks, 3, max_batches=2))) == 2
