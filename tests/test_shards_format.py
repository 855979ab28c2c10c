"""Token shards as a run reads them: checks on open (sizes, sha256, the index's checksum, the
tokenizer's hash), memory-mapped blocks equal to packed tensors, step-indexed batches (exact
resume, ranks reading disjoint rows), the run's bounded evaluation set and the data checksum
that checkpoints record."""

import dataclasses
import json
import os

import pytest
import torch

from aam_func import cli, run
from aam_func.data import (BlockLoader, DataError, ShardBlocks, eval_batches, open_prepared, pack, prepare_corpus,
                           training_data)
from aam_func.run import RunConfig, RunError
from aam_func.tokenizer import Tokenizer

TINY = dict(d_model=16, n_layers=1, n_heads=2, seq_len=16, batch_size=4, vocab_size=300, sample_tokens=0,
            precision="fp32", eval_every=0, steps=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The first 30 topics of the embedded corpus, prepared with a 300-token BPE into 700-token shards."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("shards")
    src = root / "src"
    src.mkdir()
    for i, key in enumerate(sorted(topics)[:30]):
        (src / f"{i:02d}.txt").write_text(topics[key], encoding="utf-8")
    prepare_corpus(src, root / "p", vocab_size=300, shard_tokens=700)
    return root


def _copy(prepared, tmp_path):
    import shutil

    shutil.copytree(prepared / "p", tmp_path / "p")
    return tmp_path / "p"


def test_corrupted_truncated_or_edited_data_is_an_error_naming_the_file(prepared, tmp_path):
    p = _copy(prepared, tmp_path)
    open_prepared(p)
    shard = p / "train-00002.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00002\.bin: contents differ from the index's sha256"):
        open_prepared(p)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=r"train-00002\.bin: 1398 bytes where the index says 1400"):
        open_prepared(p, verify=False)  # sizes are checked even without the sha256 pass
    p = _copy(prepared, tmp_path / "b")
    index = json.loads((p / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["tokens"] -= 1
    (p / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"index\.json: the index was changed after it was written"):
        open_prepared(p)
    (p / "index.json").unlink()
    with pytest.raises(DataError, match=r"is not a prepared data directory \(no index\.json"):
        open_prepared(p)


def test_another_tokenizer_is_refused(prepared, tmp_path):
    other = Tokenizer.train_bpe(["some other text entirely"] * 20, vocab_size=280)
    with pytest.raises(DataError, match=r"p/index\.json: made with another tokenizer"):
        open_prepared(prepared / "p", tokenizer=other)
    other.save(tmp_path / "tok")
    with pytest.raises(DataError, match=r"made with another tokenizer"):
        run.prepare(RunConfig(data=str(prepared / "p"), tokenizer=str(tmp_path / "tok"),
                              output_dir=str(tmp_path / "run"), **TINY), "cpu")


def test_corrupted_shard_via_the_cli_is_one_error_line(prepared, tmp_path, capsys):
    p = _copy(prepared, tmp_path)
    (p / "val-00000.bin").write_bytes(b"\0" * (p / "val-00000.bin").stat().st_size)
    args = ["train", "--data", str(p), "--output-dir", str(tmp_path / "run"), "--steps", "1", "--d-model", "16",
            "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--sample-tokens", "0"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "val-00000.bin: contents differ" in err


def test_shard_blocks_are_the_packed_stream_and_batches_are_step_indexed(prepared):
    pd = open_prepared(prepared / "p")
    stream = torch.from_numpy(pd.train.read(0, pd.train.n_tokens))
    blocks = ShardBlocks(pd.train, 16)
    packed = pack(stream, 16)
    assert blocks.shape == tuple(packed.shape) and torch.equal(blocks[:], packed)  # windows cross shard ends
    assert torch.equal(blocks[torch.tensor([3, 0, 87])], packed[[3, 0, 87]])
    full = BlockLoader(blocks, 8, seed=5)
    ref = BlockLoader(packed, 8, seed=5)
    steps = [0, 1, len(full) - 1, len(full), 3 * len(full) + 2]  # across epochs
    assert all(torch.equal(full.batch(s)["input_ids"], ref.batch(s)["input_ids"]) for s in steps)
    # a fresh loader (a resumed run) reads exactly the batches of the uninterrupted one
    resumed = BlockLoader(ShardBlocks(open_prepared(prepared / "p", verify=False).train, 16), 8, seed=5)
    assert all(torch.equal(resumed.batch(s)["input_ids"], full.batch(s)["input_ids"]) for s in reversed(steps))
    # each rank reads its rows only; their union is the single-process batch
    ranks = [BlockLoader(blocks, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in steps:
        assert torch.equal(torch.cat([r.batch(s)["input_ids"] for r in ranks]), full.batch(s)["input_ids"])


def test_evaluation_reads_a_fixed_bounded_spread_of_held_out_blocks(prepared):
    pd = open_prepared(prepared / "p")
    val = ShardBlocks(pd.val, 16)
    n = len(val)
    spread = val.spread(8)
    rows = [n * i // 8 for i in range(8)]
    assert len(spread) == 8 and torch.equal(spread[:], val[rows])
    assert val.spread(n + 5) is val
    assert [b["input_ids"].shape[0] for b in eval_batches(spread, 3)] == [3, 3, 2]
    data = training_data(prepared / "p", seq_len=16, batch_rows=4, eval_rows=8, seed=0)
    assert torch.equal(data.val_blocks, spread[:]) and data.train_tokens == pd.train.n_tokens


def test_run_records_absolute_data_and_checksum_and_checks_them(prepared, tmp_path, monkeypatch):
    """The stored --data path is absolute (resume/eval from elsewhere read the same corpus); the
    checkpoint records the prepared data's checksum; changed data is refused on resume and eval."""
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(os.listdir(prepared / "src"))[:12]:
        (src / name).write_text((prepared / "src" / name).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(data="src", output_dir=str(tmp_path / "run"), stop_after=1,
                    tokenizer=str(prepared / "p" / "tokenizer"), **TINY)  # no BPE to train
    run.loop(run.prepare(cfg, "cpu"))
    args = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["args"]
    pd = open_prepared(tmp_path / "run" / "data")
    assert args["data"] == str(src) and args["data_checksum"] == pd.checksum
    monkeypatch.chdir(prepared)  # another working directory
    ev = run.evaluate_checkpoint(str(tmp_path / "run"))
    assert ev["data"] == f"the held-out split of {src}"

    # "src" from this other directory is another corpus: --resume refuses it by name
    with pytest.raises(RunError, match=r"--data 'src' \(the run has '.*src'\)"):
        run.prepare(dataclasses.replace(cfg, stop_after=None, resume=""), "cpu")
    (src / "00.txt").write_text("the corpus changed " * 50, encoding="utf-8")
    with pytest.raises(DataError, match=r"data's checksum is .* as recorded for this run"):
        run.prepare(dataclasses.replace(cfg, data=str(src), stop_after=None, resume=""), "cpu")
    with pytest.raises(DataError, match=r"data's checksum is .* as recorded for this run"):
        run.evaluate_checkpoint(str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"as recorded for this run"):
        run.prepare(RunConfig(data=str(prepared / "p"), data_checksum="0" * 64, output_dir=str(tmp_path / "x"),
                              **TINY), "cpu")


def test_run_data_prepares_raw_files_where_asked_and_reads_prepared_directories(prepared, tmp_path):
    from aam_func.run.preparation import run_data

    tok = open_prepared(prepared / "p").load_tokenizer()
    common = dict(vocab_size=300, text_field="text", val_fraction=0.1)
    tok2, pd = run_data(str(prepared / "src"), str(tmp_path / "elsewhere"), str(tmp_path / "out"), tok, **common)
    assert pd.path == str(tmp_path / "elsewhere") and not (tmp_path / "out").exists() and tok2 is tok
    tok3, pd2 = run_data(str(tmp_path / "elsewhere"), None, str(tmp_path / "out"), None, **common)
    assert pd2.path == pd.path and tok3.vocab_size == tok.vocab_size  # a prepared directory: its own tokenizer
    _, pd3 = run_data(str(prepared / "src"), None, str(tmp_path / "out"), tok, expected=pd.checksum, **common)
    assert pd3.path == str(tmp_path / "out" / "data") and pd3.checksum == pd.checksum  # default place, same data
