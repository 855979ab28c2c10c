"""Checkpoints: round trip, validation of damaged files, atomicity under SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import aam_func as af
from aam_func import optim, tree
from aam_func.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from aam_func.tokenizer import Tokenizer

CFG = af.ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    return sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)


def _setup(step=1):
    params = af.Transformer(CFG).init(seed=step)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3))
    return params, opt, opt.init(params)


def test_round_trip(tmp_path):
    params, opt, state = _setup()
    tok = Tokenizer.train_bpe(["some text to learn merges from"] * 10, vocab_size=300)
    rng = {"torch": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "ck", cfg=CFG, params=params, opt_state=state, step=7, rng=rng,
                           tokenizer=tok, train_state={"args": {"lr": 1e-3}})
    names = sorted(os.listdir(path))
    assert names == ["config.json", "optimizer.safetensors", "params.safetensors", "rng.safetensors",
                     "tokenizer", "trainer_state.json"]
    ck = load_checkpoint(tmp_path / "ck", opt_template=opt.init(params))
    assert ck.cfg == CFG and ck.step == 7 and ck.train_state["args"] == {"lr": 1e-3}
    assert _same(params, ck.params)
    assert tree.names(ck.opt_state) == tree.names(state) and _same(ck.opt_state, state)
    assert torch.equal(ck.rng["torch"], rng["torch"])
    assert Tokenizer.load(ck.tokenizer_dir).encode("some text") == tok.encode("some text")
    assert ck.load_tokenizer().encode("some text") == tok.encode("some text")
    # a run directory resolves to its checkpoint/
    save_checkpoint(tmp_path / "run" / "checkpoint", cfg=CFG, params=params, step=1)
    assert resolve_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint")


def test_a_checkpoint_without_tokenizer_says_so(tmp_path):
    params, _, _ = _setup()
    save_checkpoint(tmp_path / "ck", cfg=CFG, params=params, step=1)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.tokenizer_dir is None
    for call in (ck.require_tokenizer_dir, ck.load_tokenizer):
        with pytest.raises(CheckpointError, match=r"checkpoint .*ck holds no tokenizer/ directory"):
            call()


def test_overwrite_leaves_no_leftovers(tmp_path):
    params, _, state = _setup()
    for step in (1, 2):
        save_checkpoint(tmp_path / "ck", cfg=CFG, params=params, opt_state=state, step=step)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert load_checkpoint(tmp_path / "ck").step == 2


@pytest.mark.parametrize("damage", ["truncate_params", "garbage_params", "bad_config", "no_state",
                                    "wrong_shapes", "truncate_optimizer", "missing"])
def test_damaged_checkpoints_are_clear_errors(tmp_path, damage):
    params, opt, state = _setup()
    path = save_checkpoint(tmp_path / "ck", cfg=CFG, params=params, opt_state=state, step=3)
    p = os.path.join(path, "params.safetensors")
    if damage == "truncate_params":
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.truncate(size // 2)
        match = "params file .* truncated or corrupted"
    elif damage == "garbage_params":
        with open(p, "wb") as f:
            f.write(b"\x00garbage" * 10)
        match = "params file .* truncated or corrupted"
    elif damage == "bad_config":
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write('{"vocab_size": ')
        match = "config .* corrupted"
    elif damage == "no_state":
        os.remove(os.path.join(path, "trainer_state.json"))
        match = "incomplete: trainer state"
    elif damage == "wrong_shapes":
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c["d_model"] = 64
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
        match = "do not fit its config"
    elif damage == "truncate_optimizer":
        o = os.path.join(path, "optimizer.safetensors")
        with open(o, "r+b") as f:
            f.truncate(100)
        match = "optimizer state .* truncated or corrupted"
    else:
        path = str(tmp_path / "nothing")
        match = "no checkpoint at"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, opt_template=opt.init(params))


def test_optimizer_state_mismatch(tmp_path):
    params, _, state = _setup()
    save_checkpoint(tmp_path / "ck", cfg=CFG, params=params, opt_state=state, step=1)
    other = optim.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(CheckpointError, match="does not match this optimizer"):
        load_checkpoint(tmp_path / "ck", opt_template=other)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import aam_func as af
    from aam_func import checkpoint
    from aam_func.checkpoint import save_checkpoint
    cfg = af.ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0)
    params = af.Transformer(cfg).init(seed=2)
    phase = sys.argv[1]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if phase == "mid_params":  # half of the params file written, then killed
        real = checkpoint._save_tensors
        def partial(flat, path, metadata=None):
            if path.endswith("params.safetensors"):
                with open(path, "wb") as f:
                    f.write(b"\\x08" * 100)
                    f.flush(); os.fsync(f.fileno())
                die()
            return real(flat, path, metadata)
        checkpoint._save_tensors = partial
    else:  # killed right after the n-th rename (1: old moved aside, before the new one is in place)
        n = {{"after_first_rename": 1, "after_second_rename": 2}}[phase]
        real_rename, calls = os.rename, []
        def rename(a, b):
            real_rename(a, b); calls.append(a)
            if len(calls) == n:
                die()
        checkpoint.os.rename = rename
    save_checkpoint(sys.argv[2], cfg=cfg, params=params, step=2)
    """
)


@pytest.mark.parametrize("phase", ["mid_params", "after_first_rename", "after_second_rename"])
def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path, phase):
    params, _, _ = _setup(step=1)
    target = tmp_path / "ck"
    save_checkpoint(target, cfg=CFG, params=params, step=1)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script), phase, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    ck = load_checkpoint(target)
    expected_step = 2 if phase == "after_second_rename" else 1
    assert ck.step == expected_step
    ref = params if expected_step == 1 else af.Transformer(CFG).init(seed=2)
    assert _same(ref, ck.params)
    # the next save cleans up whatever the killed one left behind
    save_checkpoint(target, cfg=CFG, params=params, step=3)
    assert sorted(os.listdir(tmp_path)) == ["ck", "killer.py"]
    assert load_checkpoint(target).step == 3
