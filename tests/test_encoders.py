"""prepare's encoders: tiktoken running the project's byte-level BPE gives exactly the
tokenizer's ids (the contract), on the embedded corpus and on generated text, for BPEs of 4096
and 32768 tokens; tokenizers it cannot run exactly are refused with the reason (and prepare
uses the tokenizer itself for them)."""

import glob
import json
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aam_func.data import DataError, default_corpus, prepare_corpus
from aam_func.data.encoders import (GPT2_PATTERN, WHITESPACE, HFEncoder, TiktokenEncoder, batch_encoder,
                                    encode_parallel, tiktoken_ranks)
from aam_func.tokenizer import EOS_TOKEN, Tokenizer

tiktoken = pytest.importorskip("tiktoken")


def _stdlib_texts() -> list[str]:
    """Python's own modules (a few MB of local text, code and prose) for a 32768-token BPE."""
    root = os.path.dirname(os.__file__)
    return [open(f, encoding="utf-8", errors="replace").read() for f in sorted(glob.glob(root + "/*.py"))]


@pytest.fixture(scope="module")
def bpe4096():
    return Tokenizer.train_bpe(default_corpus(), 4096)


@pytest.fixture(scope="module")
def bpe32768():
    tok = Tokenizer.train_bpe(default_corpus() + _stdlib_texts(), 32768, min_frequency=1)
    assert tok.vocab_size == 32768
    return tok


def _same(tok, enc, texts):
    """Every text's ids from ``enc`` (one batch, so the batch-level checks run) equal the tokenizer's."""
    got = enc.encode(list(texts))
    for text, ids in zip(texts, got):
        want = tok.encode(text)
        assert ids.dtype == np.uint32 and ids.tolist() == want, repr(text[:200])


# ----------------------------------------------------------------------------- generated text

_PIECES = st.sampled_from([
    " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u3000", "\xa0", "\u2028", "\x1c", "\x85", "\u200b",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "n't", "don't", "I'm", "it's",
    "0", "12", "2024", "3.14", "1,000", "٣", "²", "Ⅻ", "一二三",
    "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "é", "e\u0301", "日本語のテキスト", "Привет", "مرحبا", "ꙮ",
    EOS_TOKEN, "<|endoftext", "|>", "def f(x):", "    return x", "==", "->", "**", "...", "—",
])


@st.composite
def _texts(draw):
    parts = draw(st.lists(st.one_of(_PIECES, st.text(max_size=12),
                                    st.text(st.characters(codec="utf-8"), max_size=6)), max_size=30))
    text = "".join(parts)
    if draw(st.booleans()):  # a run of 256 or more non-space characters somewhere (cut by the tokenizer)
        run = draw(st.sampled_from(["x", "ab1", "é", "日本", "😀", "-", "a'sb"]))
        cut = draw(st.integers(0, len(text)))
        reps = draw(st.integers(256 // len(run) - 2, 600 // len(run)))
        text = text[:cut] + run * reps + draw(st.sampled_from(["", EOS_TOKEN, " ", "x"])) + run * 3 + text[cut:]
    return text


@settings(deadline=None)
@given(st.lists(_texts(), min_size=1, max_size=4))
def test_tiktoken_equals_tokenizer_on_generated_text_4096(bpe4096, texts):
    _same(bpe4096, batch_encoder(bpe4096), texts)


@pytest.mark.slow
@settings(deadline=None)
@given(st.lists(_texts(), min_size=1, max_size=4))
def test_tiktoken_equals_tokenizer_on_generated_text_32768(bpe32768, texts):
    _same(bpe32768, batch_encoder(bpe32768), texts)


def test_tiktoken_equals_tokenizer_on_the_embedded_corpus_4096(bpe4096):
    enc = batch_encoder(bpe4096, threads=2)
    assert isinstance(enc, TiktokenEncoder) and enc.reason == ""
    docs = default_corpus()
    _same(bpe4096, enc, docs)
    # a shifted copy (other word boundaries) and the documents joined with eos between them
    _same(bpe4096, enc, [" " + d[7:] for d in docs] + [EOS_TOKEN.join(docs[:20])])


@pytest.mark.slow
def test_tiktoken_equals_tokenizer_on_the_embedded_corpus_and_code_32768(bpe32768):
    enc = batch_encoder(bpe32768, threads=2)
    assert isinstance(enc, TiktokenEncoder)
    _same(bpe32768, enc, default_corpus() + _stdlib_texts()[:40])


def test_long_runs_found_in_a_batch(bpe4096):
    """The batch-level search flags every text with a run of 256 non-space characters (the
    exact regex decides), whatever its neighbours; the ids then still equal the tokenizer's."""
    import re

    enc = batch_encoder(bpe4096)
    exact = re.compile(f"[^{re.escape(WHITESPACE)}]{{256}}")
    texts = ["short", "y" * 255, "z" * 256, "é" * 130, " ".join(["w" * 200] * 3), "", "a\xa0" * 200,
             "\u3000".join(["q" * 255] * 2), "日本" * 200 + EOS_TOKEN + "x" * 300, "tail " + "t" * 256]
    flagged = enc._long_runs(texts)
    assert {i for i, t in enumerate(texts) if exact.search(t)} <= flagged
    assert 0 not in flagged and 1 not in flagged and 2 in flagged
    _same(bpe4096, enc, texts)
    # without the cut, tiktoken's pattern alone would differ: the check is needed
    assert enc.enc.encode_ordinary("tail " + "t" * 256) != bpe4096.encode("tail " + "t" * 256)


def test_regex_failure_falls_back_to_the_tokenizer(bpe4096):
    """tiktoken's regex gives up on a million spaces; that document is encoded by the tokenizer."""
    enc = batch_encoder(bpe4096)
    text = "a" + " " * 1_000_000
    with pytest.raises(ValueError):
        enc.enc.encode_to_numpy(text)
    _same(bpe4096, enc, ["before", text, "after"])
    assert enc.fallback_docs == 1


def test_encode_parallel_keeps_order(bpe4096):
    from concurrent.futures import ThreadPoolExecutor

    enc = batch_encoder(bpe4096, threads=3)
    docs = default_corpus()[:30] + ["", "x"]
    with ThreadPoolExecutor(3) as pool:
        futures = encode_parallel(enc, docs, pool)
        got = [a.tolist() for f in futures for a in f.result()]
    assert len(futures) == 3 and got == [bpe4096.encode(d) for d in docs]


def test_prepare_gives_the_same_shards_with_either_engine(tmp_path, bpe4096):
    docs = [d + ("z" * 300 if i % 7 == 0 else "") for i, d in enumerate(default_corpus()[:40])]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    lines = []
    a = prepare_corpus(tmp_path / "c.jsonl", tmp_path / "a", tokenizer=bpe4096, engine="tokenizers", log=lines.append)
    b = prepare_corpus(tmp_path / "c.jsonl", tmp_path / "b", tokenizer=bpe4096, engine="tiktoken", log=lines.append)
    assert any("encoding with tiktoken" in line for line in lines)
    assert any("encoding with tokenizers (asked for)" in line for line in lines)
    for split in ("train", "val"):
        assert np.array_equal(a.__getattribute__(split).read(0, len(a.__getattribute__(split))),
                              b.__getattribute__(split).read(0, len(b.__getattribute__(split))))
    assert a.checksum == b.checksum  # the same data, whichever engine made it


# ----------------------------------------------------------------------------- refusals


def _edited(tok, edit) -> Tokenizer:
    from tokenizers import Tokenizer as Raw
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    edit(spec)
    raw = Raw.from_str(json.dumps(spec))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN))


def _swap_two_merged_ids(spec):
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\S{128}"), "pre-tokenizer"),
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
    (lambda s: s["model"].update(ignore_merges=True), "ignore_merges"),
    (_swap_two_merged_ids, "merge order"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "plain special token"),
])
def test_unconvertible_tokenizers_use_the_tokenizer(bpe4096, edit, reason, tmp_path):
    tok = _edited(bpe4096, edit)
    enc = batch_encoder(tok)
    assert isinstance(enc, HFEncoder) and reason in enc.reason
    with pytest.raises(DataError, match=f"engine='tiktoken'.*{reason}"):
        prepare_corpus(None, tmp_path / "p", tokenizer=tok, engine="tiktoken")


def test_a_token_that_does_not_encode_to_itself_is_refused():
    """Merges (b,c), (a,b), (ab,c): the BPE encodes "abc" as [a, bc] ((a,bc) is no merge), while
    tiktoken, which merges any two adjacent tokens that make a token, would give [abc]."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aam_func.data.encoders import byte_symbols

    symbols = sorted(byte_symbols(), key=byte_symbols().get)
    vocab = {EOS_TOKEN: 0, **{c: 1 + i for i, c in enumerate(symbols)}}
    vocab.update(bc=257, ab=258, abc=259)
    raw = Raw(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([EOS_TOKEN])
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN))
    assert tok.encode("abc") == [vocab["a"], 257]
    found, _ = tiktoken_ranks(raw)
    ranks, specials, _ = found  # the structure alone passes ...
    naive = tiktoken.Encoding("naive", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    assert naive.encode_ordinary("abc") == [259]  # ... and tiktoken would differ
    enc = batch_encoder(tok)
    assert isinstance(enc, HFEncoder) and "do not encode to themselves" in enc.reason


def test_without_tiktoken_the_tokenizer_is_used(bpe4096, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    enc = batch_encoder(bpe4096)
    assert isinstance(enc, HFEncoder) and "not installed" in enc.reason
    lines = []
    prepare_corpus(None, tmp_path / "p", tokenizer=bpe4096, log=lines.append)
    assert any("encoding with tokenizers (tiktoken is not installed" in line for line in lines)


def test_engine_must_be_known(bpe4096):
    with pytest.raises(ValueError, match="engine must be"):
        batch_encoder(bpe4096, engine="fast")


# ----------------------------------------------------------------------------- character classes


@pytest.mark.slow
def test_unicode_classes_agree_between_the_two_regex_engines():
    r"""The pattern's \p{L}, \p{N} and \s are the same sets of code points in the tokenizer's
    regex engine (Oniguruma) and in tiktoken's (Rust regex): probed for every code point of
    planes 0-3 and 14 (the others hold no letter, digit or space in any Unicode version), and
    WHITESPACE is the engine's \s over all of Unicode."""
    from tokenizers import Regex, pre_tokenizers

    every = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, every))

    def engine(cls):
        kept = set("".join(p for p, _ in pre_tokenizers.Split(Regex(cls), "removed").pre_tokenize_str(text)))
        return {c for c in every if chr(c) not in kept}

    assert engine(r"\s") == {ord(c) for c in WHITESPACE}
    cps = [c for c in every if c < 0x40000 or 0xE0000 <= c < 0xF0000]
    for cls, prefix in ((r"\p{L}", "x"), (r"\p{N}", "1")):
        onig = {c for c in engine(cls) if c < 0x40000 or 0xE0000 <= c < 0xF0000}
        assert len(onig) > 1000
        # tiktoken: "x" + c is one piece (so found whole in the ranks) exactly when c is a letter
        # (with "1": a digit); the probes are separated by newlines
        found = set()
        for lo in range(0, len(cps), 1 << 17):
            part = cps[lo:lo + (1 << 17)]
            ranks = {bytes([b]): b for b in range(256)}
            back = {}
            for c in part:
                ranks[(prefix + chr(c)).encode()] = back_id = len(ranks)
                back[back_id] = c
            probe = tiktoken.Encoding("probe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
            ids = probe.encode_to_numpy("\n".join(prefix + chr(c) for c in part), disallowed_special=())
            found.update(back[i] for i in ids.tolist() if i in back)
        assert found == onig, cls
