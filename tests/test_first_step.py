"""What a run on prepared data does before its first step: the tokenizer is loaded lazily (size
and eos id from the index; the directory copied when saved; its hash checked when it is loaded),
so transformers is not imported; the shards are still verified."""

import json
import os
import subprocess
import sys

import pytest

from aam_func.data import DataError, open_prepared, prepare_corpus
from aam_func.tokenizer import LazyTokenizer, Tokenizer, TokenizerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(n=30):
    from pydoc_data.topics import topics

    return [f"doc {i}: " + topics[k][:1200] for i, k in enumerate(sorted(topics)[:n])]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    tok = Tokenizer.train_bpe(_docs(), vocab_size=300)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs()), encoding="utf-8")
    return prepare_corpus(root / "c.jsonl", root / "p", tokenizer=tok), tok


def test_the_prepared_tokenizer_loads_when_used(prepared, tmp_path):
    pd, tok = prepared
    lazy = pd.load_tokenizer()
    assert isinstance(lazy, LazyTokenizer) and isinstance(lazy, Tokenizer)
    assert (lazy.vocab_size, lazy.eos_token_id) == (tok.vocab_size, tok.eos_token_id)
    lazy.save(tmp_path / "copy")  # a copy of the directory, nothing loaded
    assert lazy._loaded is None and "not loaded yet" in repr(lazy)
    assert Tokenizer.load(tmp_path / "copy").encode("def f(x): return x") == tok.encode("def f(x): return x")
    text = "a text, with 12 digits"
    assert lazy.encode(text) == tok.encode(text) and lazy._loaded is not None
    assert lazy(text)["input_ids"].tolist() == tok(text)["input_ids"].tolist()  # the options pass through
    assert lazy.decode(tok.encode(text)) == text and lazy.pad_token_id == tok.pad_token_id
    lazy.save(tmp_path / "saved")  # loaded: saved by transformers
    assert Tokenizer.load(tmp_path / "saved").vocab_size == tok.vocab_size


def test_a_replaced_tokenizer_directory_is_refused_when_loaded(prepared, tmp_path):
    import shutil

    pd, _ = prepared
    copy = tmp_path / "p"
    shutil.copytree(pd.path, copy)
    other = Tokenizer.train_bpe([d.upper() for d in _docs()], vocab_size=300)  # same size and eos id, other merges
    shutil.rmtree(copy / "tokenizer")
    other.save(copy / "tokenizer")
    lazy = open_prepared(copy).load_tokenizer()
    with pytest.raises(DataError, match=r"tokenizer: not the tokenizer that made these shards"):
        lazy.encode("x")
    small = Tokenizer.train_bpe(_docs(), vocab_size=280)
    shutil.rmtree(copy / "tokenizer")
    small.save(copy / "tokenizer")
    with pytest.raises(TokenizerError, match=r"has 280 tokens and eos id 0, not 300 and 0 as recorded"):
        open_prepared(copy).load_tokenizer().encode("x")


def test_a_corrupted_shard_is_still_refused_before_training(prepared, tmp_path):
    import shutil

    from aam_func import run

    pd, _ = prepared
    copy = tmp_path / "p"
    shutil.copytree(pd.path, copy)
    shard = copy / pd.index["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    cfg = run.RunConfig(data=str(copy), output_dir=str(tmp_path / "run"), steps=1, d_model=16, n_layers=1, n_heads=2,
                        seq_len=16, batch_size=2, eval_every=0, sample_tokens=0)
    with pytest.raises(DataError, match=r"train-00000\.bin: contents differ from the index's sha256"):
        run.prepare(cfg, "cpu")


_NO_TRANSFORMERS = """
import sys
from aam_func import run
seen = []
def log(line):
    if line.startswith("step 1/") and not seen:
        seen.append("transformers" in sys.modules)
cfg = run.RunConfig(data=sys.argv[1], output_dir=sys.argv[2], steps=2, stop_after=1, d_model=16, n_layers=1,
                    n_heads=2, seq_len=16, batch_size=2, eval_every=0, eval_batches=1, sample_tokens=0, log_every=1)
run.loop(run.prepare(cfg, "cpu", log=log))
print("TRANSFORMERS_BEFORE_STEP_1", seen[0])
"""


@pytest.mark.slow
def test_training_on_prepared_data_does_not_import_transformers_before_its_first_step(prepared, tmp_path):
    pd, _ = prepared
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _NO_TRANSFORMERS, pd.path, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRANSFORMERS_BEFORE_STEP_1 False" in out.stdout
    # the run's saved tokenizer is the prepared one
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").vocab_size == pd.index["vocab_size"]
