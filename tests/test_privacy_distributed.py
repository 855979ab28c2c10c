"""A private run under torchrun: the clipped sums are added over the processes and one noise draw
(the same on every rank) is added, so two processes train what one process trains."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--vocab-size", "300",
        "--sample-tokens", "0", "--eval-every", "0", "--eval-batches", "2", "--attention-backend", "math",
        "--batch-size", "8", "--steps", "4", "--dp-epsilon", "8", "--dp-accountant", "rdp"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["train", "--data", str(corpus), "--output-dir", str(one), *TINY]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, "cli",
           "train", "--data", str(corpus), "--output-dir", str(two), "--tokenizer", str(one / "tokenizer"), *TINY]
    r = subprocess.run(cmd, cwd=ROOT, env={**_env(), "SAVE_LOG": str(tmp_path / "saves.log")}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("privacy: epsilon") == 1  # rank 0 reports
    a = load_file(one / "checkpoint" / "params.safetensors")
    b = load_file(two / "checkpoint" / "params.safetensors")
    for k in a:  # the same batches and noise; only the order of the float sums differs
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
