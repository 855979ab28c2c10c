"""Tokenizer: corpus-trained byte-level BPE, offline loading, batch encode/decode, errors."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aam_func.tokenizer import EOS_TOKEN, Tokenizer, TokenizerError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The with statement wraps a block with methods of a context manager.",
    "Les caractères accentués et les emojis 🐍 survivent au BPE octet.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=400)


@given(st.text(max_size=200))
def test_byte_level_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_trained_vocab_and_special_tokens(tok):
    assert 257 <= tok.vocab_size <= 400
    assert tok.hf.convert_ids_to_tokens(tok.eos_token_id) == EOS_TOKEN
    assert tok.pad_token_id == tok.eos_token_id
    # merges were learned: a frequent word is fewer tokens than bytes
    assert len(tok.encode("return")) < len("return")


def test_saved_dir_loads_with_autotokenizer_offline(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    text = TEXTS[1]
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    again = Tokenizer.load(tmp_path / "tok")
    assert again.encode(text) == tok.encode(text) and again.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_and_mask(tok, side):
    texts = ["a", "def add(a, b): return a + b"]
    out = tok(texts, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.dtype == torch.long
    lens = [len(tok.encode(t)) for t in texts]
    assert mask.sum(1).tolist() == lens
    for i, t in enumerate(texts):
        real = ids[i][mask[i].bool()].tolist()
        assert real == tok.encode(t)
        if side == "left":
            assert mask[i, -1] == 1
        else:
            assert mask[i, 0] == 1
    assert tok.decode(ids) == [tok.decode(ids[i][mask[i].bool()]) for i in range(2)]


def test_truncation_and_max_length_padding(tok):
    out = tok([TEXTS[1]], max_length=5, padding="max_length")
    assert out["input_ids"].shape == (1, 5) and out["attention_mask"].sum() == 5
    assert out["input_ids"][0].tolist() == tok.encode(TEXTS[1])[:5]
    out = tok(["a"], max_length=6, padding="max_length")
    assert out["input_ids"].shape == (1, 6) and out["attention_mask"].sum() == len(tok.encode("a"))
    with pytest.raises(TokenizerError, match="different lengths"):
        tok(["a", TEXTS[1]], padding=False)


def test_unknown_name_offline_is_a_clear_error():
    with pytest.raises(TokenizerError, match="not available offline.*local tokenizer directory"):
        Tokenizer.load("surely-not-a-cached-model-name-xyz")


def test_missing_or_empty_directory_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nope") + os.sep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot load a tokenizer from directory"):
        Tokenizer.load(tmp_path / "empty")


def test_bad_vocab_size():
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train_bpe(TEXTS, vocab_size=100)
