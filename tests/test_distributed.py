"""Data parallelism (aam_func.distributed): 2 gloo processes on CPU equal 1 process on the global
batch; a dead or stalled rank ends the others with a clear error, never a hang; sharding, resume
at another world size, bucketing, and the argument errors.

Every multi-process case runs real processes (``torchrun`` or its environment variables on
loopback) under subprocess timeouts, so a regression that hangs fails the test instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli, distributed, tree
from aam_func.data import BlockLoader, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--vocab-size", "300",
        "--sample-tokens", "0", "--precision", "fp32", "--eval-every", "0"]
PROC_TIMEOUT = 120  # no single process of these tests should come near it


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    """One process, global batch 8, 10 steps (in this process): the reference run."""
    out = tmp_path_factory.mktemp("single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--data", str(corpus), "--steps", "10", "--batch-size", "8",
                         "--output-dir", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(cmd: list[str], world: int = 2, **extra) -> list[subprocess.Popen]:
    """``world`` processes of ``cmd`` with the environment torchrun would give them (loopback)."""
    port = _free_port()
    return [subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r, WORLD_SIZE=world,
                                      LOCAL_RANK=r, **extra))
            for r in range(world)]


def _finish(procs: list[subprocess.Popen], timeout: float = PROC_TIMEOUT) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _run_world(cmd: list[str], world: int = 2, **extra) -> list[tuple[int, str, str]]:
    """Launch and wait; once more on a port taken between choosing and binding it."""
    results = _finish(_launch(cmd, world, **extra))
    if any(code != 0 and ("EADDRINUSE" in err or "address already in use" in err.lower()) for code, _, err in results):
        results = _finish(_launch(cmd, world, **extra))
    return results


def _params(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "checkpoint", "params.safetensors"))


def _assert_same_params(a: dict, b: dict, d_model: int = 32) -> None:
    """Equal to 1e-6, except the key third of the qkv bias: its exact gradient is zero (softmax
    ignores a shift of every score in a row), so AdamW moves it by normalised float32 rounding
    noise; a single process with --accumulate 2 differs from --batch-size 8 there by as much."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        if k.endswith("attn.qkv.bias"):
            key = slice(d_model, 2 * d_model)
            assert diff[key].max() <= 1e-5, k
            diff = torch.cat([diff[:d_model], diff[2 * d_model:]])
        assert diff.max() <= 1e-6, (k, float(diff.max()))


# ----------------------------------------------------------------------------- equal to one process


def test_two_gloo_processes_equal_one_process_library_float64(tmp_path):
    """The library path (broadcast_tree, grad_reduce with 2 KB buckets, clipping, AdamW) in
    float64 with very unequal padding per rank: token weighting makes it the global mean."""
    import _dist_worker as w
    from aam_func.train import make_lm_loss, make_train_step

    results = _run_world([sys.executable, WORKER, "lib", str(tmp_path)])
    assert [c for c, _, _ in results] == [0, 0], [e[-2000:] for _, _, e in results]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))

    model, params, opt, batches = w.problem()
    step = make_train_step(make_lm_loss(model), opt)
    state = step.init(params)
    losses = []
    for b in batches:
        params, state, m = step(params, state, b)
        losses.append(m["loss"])
    ref = tree.flatten(params)
    for k, v in ref.items():
        assert torch.equal(r0[k], r1[k]), k  # replicas stay bitwise equal
        assert (r0[k] - v).abs().max() <= 1e-9, k
    assert torch.allclose(r0["__losses__"], torch.stack(losses), rtol=0, atol=1e-12)
    assert int(r0["__tokens__"]) == int(batches[-1]["attention_mask"].sum())


def test_torchrun_two_processes_equal_one_process_and_save_once(tmp_path, corpus, single):
    out, log = tmp_path / "two", tmp_path / "saves.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, "cli",
           "train", "--data", str(corpus), "--steps", "10", "--batch-size", "8", "--output-dir", str(out),
           "--tokenizer", str(single / "tokenizer"), "--log-every", "5", "--log-to", "tensorboard", *TINY]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(SAVE_LOG=log), capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert log.read_text().split("\n") == ["0 10", ""]  # rank 0 wrote the checkpoint, once
    assert len(os.listdir(out / "tensorboard")) == 1  # and the only event file
    assert r.stdout.count("checkpoint:") == 1 and r.stdout.count("step 10/10") == 1  # rank 0 logs
    assert "data parallel over 2 processes (gloo), 4 rows each" in r.stdout
    _assert_same_params(_params(out), _params(single))
    # the logged loss is the global one: the same figure the single process printed
    last = [line for line in r.stdout.splitlines() if line.startswith("step 10/10")]
    ref = [line for line in (single / "metrics.jsonl").read_text().splitlines() if '"step": 10, "loss"' in line]
    assert last and ref
    import json

    assert abs(float(last[0].split()[3]) - json.loads(ref[0])["loss"]) < 1e-3


def test_resume_at_another_world_size(tmp_path, corpus, single):
    """5 steps in one process, then 5 more in two: the same params as 10 steps in one."""
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--steps", "10", "--stop-after", "5", "--batch-size", "8",
                     "--output-dir", str(out), "--tokenizer", str(single / "tokenizer"), *TINY]) == 0
    results = _run_world([sys.executable, "-m", "aam_func", "train", "--output-dir", str(out), "--resume",
                          "--steps", "10", "--sample-tokens", "0"])
    assert [c for c, _, _ in results] == [0, 0], [e[-2000:] for _, _, e in results]
    assert "resumed from" in results[0][1] and results[1][1] == ""  # only rank 0 prints
    _assert_same_params(_params(out), _params(single))


# ----------------------------------------------------------------------------- failures end, never hang


def _start_training(tmp_path, corpus, single, timeout_s: float):
    procs = _launch([sys.executable, "-m", "aam_func", "train", "--data", str(corpus), "--steps", "100000",
                     "--batch-size", "8", "--output-dir", str(tmp_path / "run"), "--tokenizer",
                     str(single / "tokenizer"), "--log-every", "1", "--dist-timeout", str(timeout_s), *TINY])
    deadline = time.monotonic() + PROC_TIMEOUT
    seen = []
    while time.monotonic() < deadline:  # rank 0 prints a line per step once training runs
        line = procs[0].stdout.readline()
        seen.append(line)
        if line.startswith("step 3/") or (line == "" and procs[0].poll() is not None):
            break
    if not any(s.startswith("step 3/") for s in seen):
        errors = [e[-1500:] for _, _, e in _finish(procs, timeout=1)]
        pytest.fail("training did not start: " + "".join(seen)[-2000:] + " / stderr: " + " | ".join(errors))
    return procs


@pytest.mark.parametrize("victim,how", [(1, signal.SIGKILL), (1, signal.SIGSTOP),
                                         pytest.param(0, signal.SIGKILL, marks=pytest.mark.slow)])
def test_dead_or_stalled_rank_ends_the_others_with_a_clear_error(tmp_path, corpus, single, victim, how):
    """SIGKILL closes the dead rank's sockets: the survivor fails at once. SIGSTOP leaves them
    open and silent: the survivor fails when --dist-timeout (10 s) runs out. (10, not less: rank
    0's preparation and an uneven step on a loaded 2-core machine must fit in it.)"""
    procs = _start_training(tmp_path, corpus, single, timeout_s=10)
    os.kill(procs[victim].pid, how)
    survivor = procs[1 - victim]
    t0 = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving rank hung after its peer was stopped")
    finally:
        procs[victim].kill()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    waited = time.monotonic() - t0
    assert survivor.returncode == 1, err[-2000:]
    assert f"error: rank {1 - victim} of 2: all_reduce of gradients failed; another process died or did not answer" in err
    assert "Traceback" not in err
    assert waited < 60


def test_sigterm_from_torchrun_saves_on_rank_0_and_exits_143(tmp_path, corpus, single):
    """torchrun turns Ctrl-C into SIGTERM for its workers: rank 0 saves, every rank exits with
    SIGTERM's conventional status 143 (128 + 15)."""
    procs = _start_training(tmp_path, corpus, single, timeout_s=30)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    results = _finish(procs, timeout=60)
    assert [c for c, _, _ in results] == [143, 143], [e[-1500:] for _, _, e in results]
    assert "interrupted at step" in results[0][2] and "torchrun --nproc-per-node 2 -m aam_func train" in results[0][2]
    assert "interrupted" not in results[1][2]
    import json

    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 3


# ----------------------------------------------------------------------------- errors, sharding, buckets


def test_batch_size_not_divisible_by_world_size_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--batch-size", "8", "--output-dir", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "error: --batch-size 8 is the global batch and must be divisible by the number of processes (3)" in err
    assert not (tmp_path / "checkpoint").exists()


def test_missing_master_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR and MASTER_PORT not set; launch with torchrun"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(distributed.DistributedError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        distributed.env_world()


def test_single_process_without_torchrun_env_is_not_distributed(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.env_world()
    assert isinstance(env, distributed.World) and (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert distributed.init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is None


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_loader_is_disjoint_and_unites_to_the_global_batch(world):
    blocks = torch.arange(40 * 3).view(40, 3)
    full = BlockLoader(blocks, 8, seed=5)
    shards = [BlockLoader(blocks, 8, seed=5, rank=r, world_size=world) for r in range(world)]
    for step in (0, 3, 4, 11):  # 11: the third epoch, another permutation
        parts = [s.batch(step)["input_ids"] for s in shards]
        assert all(p.shape == (8 // world, 3) for p in parts)
        assert torch.equal(torch.cat(parts), full.batch(step)["input_ids"])
        rows = {tuple(r.tolist()) for p in parts for r in p}
        assert len(rows) == 8  # disjoint
    assert len(shards[0]) == len(full)


def test_sharded_loader_rejects_bad_shapes():
    blocks = torch.zeros(20, 4, dtype=torch.long)
    with pytest.raises(DataError, match="a global batch of 6 rows cannot be split evenly over 4 processes"):
        BlockLoader(blocks, 6, world_size=4)
    with pytest.raises(DataError, match="rank must be in"):
        BlockLoader(blocks, 4, rank=2, world_size=2)


def test_buckets_respect_size_and_dtype_and_round_trip():
    ts = [torch.ones(100), torch.ones(300), torch.ones(50, dtype=torch.float64), torch.ones(10), torch.ones(1000)]
    groups = distributed._buckets(ts, bucket_bytes=1600)
    assert [[t.numel() for t in g] for g in groups] == [[100, 300], [50], [10], [1000]]
    src = [torch.randn(3, 4), torch.randn(5)]
    dst = [torch.empty(3, 4), torch.empty(5)]
    distributed._unpack_into(distributed._pack(src), dst)
    assert all(torch.equal(a, b) for a, b in zip(src, dst))
