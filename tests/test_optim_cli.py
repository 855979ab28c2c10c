"""``aam-func train --optimizer ... --ema DECAY``: the run's optimizer recipe, the flags' errors,
and a run that saves the averaged params and resumes bit-exactly from the trained ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli, optim, run, tree
from aam_func.run import RunConfig, RunError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=4, vocab_size=300, sample_tokens=0,
            precision="fp32", eval_every=0)


def _params():
    g = torch.Generator().manual_seed(0)
    return {"embed": {"weight": torch.randn(10, 4, generator=g)},
            "fc": {"weight": torch.randn(6, 4, generator=g), "bias": torch.zeros(6)},
            "ln": {"weight": torch.ones(4)}}


@pytest.mark.parametrize("name", optim.RUN_OPTIMIZERS)
@pytest.mark.parametrize("ema", [None, 0.9])
def test_run_optimizer_builds_each_choice_and_logs_its_learning_rate(name, ema):
    params = _params()
    opt = optim.run_optimizer(params, optimizer=name, learning_rate=1e-2, total_steps=10, warmup_steps=2,
                              end_value=1e-3, weight_decay=0.1, max_grad_norm=1.0, ema=ema)
    state = opt.init(params)
    grads = tree.map(lambda p: torch.ones_like(p), params)
    start = params
    for _ in range(3):  # the first step's warmup rate is 0
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    assert all(not torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(start)))
    assert float(optim.current_learning_rate(state)) > 0
    assert optim.has_average(state) == (ema is not None or name == "schedule-free")


def test_run_config_and_flags_refuse_bad_optimizer_settings(capsys):
    with pytest.raises(RunError, match="optimizer"):
        RunConfig(optimizer="sgd")
    with pytest.raises(RunError, match="ema"):
        RunConfig(ema=1.5)
    with pytest.raises(RunError, match="muon_lr"):
        RunConfig(muon_lr=-0.1)
    for argv in (["--optimizer", "sgd"], ["--ema", "-0.5"], ["--muon-lr", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["train", *argv])
        assert argv[0] in capsys.readouterr().err


def _ckpt(path):
    return load_file(path / "checkpoint" / "params.safetensors"), load_file(path / "checkpoint" / "optimizer.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, ema", [("muon", 0.9), ("schedule-free", None)])
def test_averaged_run_saves_the_average_and_resumes_bitwise(tmp_path, corpus, optimizer, ema):
    common = dict(TINY, data=str(corpus), steps=4, optimizer=optimizer, ema=ema)
    full = run.loop(run.prepare(RunConfig(**common, output_dir=str(tmp_path / "full")), "cpu"))
    params, opt_file = _ckpt(tmp_path / "full")
    trained = {k[len("train_params."):]: v for k, v in opt_file.items() if k.startswith("train_params.")}
    assert set(trained) == set(params) and any(not torch.equal(trained[k], params[k]) for k in params)
    # the saved params are eval_params of the saved state at the trained params, and what the run evaluated
    state = tree.unflatten({k: v for k, v in opt_file.items() if not k.startswith("train_params.")})
    shown = tree.flatten(optim.eval_params(state, tree.unflatten(trained)))
    assert all(torch.equal(shown[k], params[k]) for k in params)
    assert all(torch.equal(tree.flatten(full.params)[k], params[k]) for k in params)

    split = RunConfig(**common, output_dir=str(tmp_path / "split"), stop_after=2)
    run.loop(run.prepare(split, "cpu"))
    resumed = run.prepare(dataclasses.replace(split, stop_after=None, resume=""), "cpu")
    assert resumed.start == 2
    run.loop(resumed)
    p2, o2 = _ckpt(tmp_path / "split")
    assert all(torch.equal(p2[k], params[k]) for k in params)
    assert o2.keys() == opt_file.keys() and all(torch.equal(o2[k], opt_file[k]) for k in opt_file)
    with pytest.raises(RunError, match="--optimizer"):
        RunConfig(**{**common, "optimizer": "lion", "steps": 6}, output_dir=str(tmp_path / "split"),
                  resume="").for_resume(_checkpoint(tmp_path / "split"))


def _checkpoint(path):
    from aam_func.checkpoint import load_checkpoint

    return load_checkpoint(path / "checkpoint", load_optimizer=False)
