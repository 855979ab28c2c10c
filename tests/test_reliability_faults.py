"""Fault injection (slow): runs killed by SIGKILL or SIGTERM at random moments, with
``--save-every 1`` and, in half of them, a non-finite loss injected at a chosen step. After
each kill the newest checkpoint is finite and loads; resuming finishes the run; and the final
params equal those of an uninterrupted run with the same injection, bit for bit (without an
injection: the plain uninterrupted run's)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli, tree
from aam_func.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "300", "--sample-tokens", "0", "--eval-every", "0", "--eval-batches", "1",
        "--precision", "fp32", "--steps", str(STEPS), "--save-every", "1"]

# runs aam-func train with a NaN loss at training step POISON_STEP (1-based; 0: none): the loss
# function reads which step the loop is taking, so evaluation and the other steps are untouched
DRIVER = """
import os, sys
import aam_func.run.state as state
import aam_func.run.training as training
from aam_func import cli

POISON = int(os.environ["POISON_STEP"])
now = [0]
real_make, real_step = state.make_lm_loss, training._step

def make_lm_loss(model, *, train=True):
    loss_fn = real_make(model, train=train)
    def poisoned(params, batch, generator=None):
        loss = loss_fn(params, batch) if generator is None else loss_fn(params, batch, generator)
        return loss * float("nan") if now[0] == POISON else loss
    return poisoned

def step(run, trainable, opt_state, at):
    now[0] = at + 1
    try:
        return real_step(run, trainable, opt_state, at)
    finally:
        now[0] = 0

state.make_lm_loss, training._step = make_lm_loss, step
sys.exit(cli.main(sys.argv[1:]))
"""

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _env(poison: int):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               POISON_STEP=str(poison))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _train(driver, args, poison, **kw):
    return subprocess.Popen([sys.executable, str(driver), "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(poison), cwd=ROOT, **kw)


def _params(out):
    return load_file(os.path.join(out, "checkpoint", "params.safetensors"))


def test_random_kills_and_divergence_never_lose_a_good_model(tmp_path, corpus):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    seed_run = tmp_path / "tok"
    assert cli.main(["train", "--data", str(corpus), "--output-dir", str(seed_run), *TINY[:-4], "--steps", "1"]) == 0
    common = ["--data", str(corpus), "--tokenizer", str(seed_run / "tokenizer"), *TINY]
    rng = random.Random(0)
    poisons = [0, 4, 9]
    references = {}
    for poison in poisons:
        out = tmp_path / f"ref-{poison}"
        p = _train(driver, [*common, "--output-dir", str(out)], poison)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        references[poison] = _params(out)
    assert not all(torch.equal(references[0][k], references[4][k]) for k in references[0])  # the injection shows

    for trial in range(20):
        poison = poisons[trial % 3]
        how = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        out = tmp_path / f"trial-{trial}"
        proc = _train(driver, [*common, "--output-dir", str(out)], poison)
        deadline = time.time() + 300
        while not (out / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(how)
        _, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, err
        ck = load_checkpoint(out)  # the newest checkpoint: complete, finite (load refuses NaN)
        assert all(torch.isfinite(t).all() for t in tree.leaves(ck.params))
        resumed = ck.step < STEPS
        if resumed:
            assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGTERM), (trial, proc.returncode, err)
            p = _train(driver, [*common, "--output-dir", str(out), "--resume"], poison)
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, (trial, err)
        final, ref = _params(out), references[poison]
        assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref), (trial, poison, how)
        if resumed or how == signal.SIGTERM:  # a SIGKILL mid-save leaves leftovers that the next save removes
            assert not [n for n in os.listdir(out) if ".tmp-" in n or ".old-" in n], (trial, how)
