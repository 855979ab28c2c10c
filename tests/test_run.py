"""aam_func.run, the training run as a library: RunConfig (validated, frozen, resolved against a
checkpoint), prepare + loop in-process equal to the CLI, bit-exact resume, and its own errors."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli, run
from aam_func.cli import CLIError
from aam_func.run import RunConfig, RunError

TINY = dict(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=4, vocab_size=300, sample_tokens=0,
            precision="fp32", eval_every=0)
TINY_FLAGS = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
              "--vocab-size", "300", "--sample-tokens", "0", "--precision", "fp32", "--eval-every", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- RunConfig


@pytest.mark.parametrize("changes,field", [
    (dict(steps=0), "steps"), (dict(steps=True), "steps"), (dict(batch_size=2.0), "batch_size"),
    (dict(val_fraction=0.95), "val_fraction"), (dict(val_fraction=0.0), "val_fraction"), (dict(lr=0), "lr"),
    (dict(dropout=1.0), "dropout"), (dict(warmup_steps=-1), "warmup_steps"), (dict(precision="fp64"), "precision"),
    (dict(attention_type="linear"), "attention_type"), (dict(attention_backend="fast"), "attention_backend"),
    (dict(compile=1), "compile"), (dict(output_dir=None), "output_dir"), (dict(seed=1.5), "seed"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"), (dict(lr=float("inf")), "lr"),
    (dict(weight_decay=float("inf")), "weight_decay"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
    (dict(dist_timeout=float("inf")), "dist_timeout"),
    (dict(lora_alpha=float("inf"), lora_rank=2, init_from="ck"), "lora_alpha"),
])
def test_run_config_errors_name_the_field(changes, field):
    with pytest.raises(RunError, match=field):
        RunConfig(**changes)


def test_run_config_combinations_are_run_errors_naming_the_flag():
    with pytest.raises(RunError, match="--lora-rank needs --init-from"):
        RunConfig(lora_rank=2)
    with pytest.raises(RunError, match=r"^lora_rank must be an int >= 1"):  # the field, by INT_MINIMUM
        RunConfig(lora_rank=0, init_from="x")
    with pytest.raises(RunError, match=r"^lora_rank must be an int"):
        RunConfig(lora_rank=2.0, init_from="x")
    with pytest.raises(RunError, match="give one of them"):
        RunConfig(init_from="x", resume="")
    with pytest.raises(RunError, match="seq_len may be None"):
        RunConfig(seq_len=None)
    with pytest.raises(RunError, match="--lora-alpha only apply with --lora-rank"):
        RunConfig.from_flags({"lora_alpha": 4.0}, given={"lora_alpha"})
    with pytest.raises(RunError, match="--d-model cannot be combined with --init-from"):
        RunConfig.from_flags({"init_from": "x", "d_model": 64}, given={"init_from", "d_model"})
    assert not issubclass(RunError, CLIError) and issubclass(RunError, ValueError)


def test_run_config_is_frozen_and_replace_validates():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 10
    assert dataclasses.replace(cfg, steps=10).steps == 10 and cfg.steps == 400
    with pytest.raises(RunError, match="steps"):
        dataclasses.replace(cfg, steps=-1)
    assert RunConfig(steps=5).warmup == 1 and RunConfig(steps=400).warmup == 40
    assert RunConfig(steps=5, warmup_steps=9).warmup == 5


def test_cli_defaults_are_the_run_config_defaults():
    """The parser reads its defaults from RunConfig: parsing ``train`` alone gives RunConfig()."""
    args = cli.build_parser().parse_args(["train"])
    assert RunConfig.from_flags(vars(args)) == RunConfig()
    assert set(RunConfig().saved_args()) == set(vars(args)) - {"command", "resume", "overwrite"}


def test_from_flags_with_init_from_leaves_the_checkpoints_settings_open():
    cfg = RunConfig.from_flags({"init_from": "ck", "seq_len": 128, "dropout": 0.0}, given={"init_from"})
    assert cfg.seq_len is None and cfg.dropout is None and cfg.gradient_checkpointing is None
    given = RunConfig.from_flags({"init_from": "ck", "seq_len": 16, "dropout": 0.1}, given={"init_from", "seq_len", "dropout"})
    assert given.seq_len == 16 and given.dropout == 0.1
    ckpt = SimpleNamespace(train_state={"args": {"seq_len": 64}}, cfg=SimpleNamespace(max_seq_len=48))
    assert cfg.for_init_from(ckpt).seq_len == 48  # the checkpoint's length, at most its model's maximum
    assert given.for_init_from(ckpt).seq_len == 16


def test_for_resume_takes_the_runs_identity_from_the_checkpoint():
    saved = {**RunConfig(seed=7, lr=1e-3, batch_size=8, steps=10, eval_every=5).saved_args(), "sample_tokens": 3}
    ckpt = SimpleNamespace(train_state={"args": saved}, step=4, path="ck")
    cfg = RunConfig(resume="", steps=20, eval_every=0, sample_tokens=0).for_resume(ckpt)
    assert (cfg.seed, cfg.lr, cfg.batch_size) == (7, 1e-3, 8)  # identity: the checkpoint's
    assert (cfg.steps, cfg.eval_every, cfg.sample_tokens) == (20, 0, 0)  # this invocation's
    old = SimpleNamespace(train_state={"args": {"seed": 3}}, step=4, path="ck")  # an older checkpoint: fewer keys
    assert RunConfig(resume="", steps=20).for_resume(old).seed == 3
    with pytest.raises(RunError, match="already at step 4"):
        RunConfig(resume="", steps=4).for_resume(ckpt)
    with pytest.raises(RunError, match="LoRA fine-tune"):
        RunConfig(resume="").for_resume(SimpleNamespace(train_state={"lora": {"rank": 1}}, step=1, path="ck"))


# ----------------------------------------------------------------------------- prepare + loop


def _params(out):
    return load_file(out / "checkpoint" / "params.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_library_run_equals_the_cli_and_resumes_bitwise(tmp_path, corpus, capsys):
    common = dict(TINY, data=str(corpus), steps=4, dropout=0.1)
    assert cli.main(["train", "--data", str(corpus), "--steps", "4", "--dropout", "0.1", "--output-dir",
                     str(tmp_path / "cli"), *TINY_FLAGS]) == 0
    capsys.readouterr()

    lines = []
    prepared = run.prepare(RunConfig(**common, output_dir=str(tmp_path / "lib")), "cpu", log=lines.append)
    assert prepared.start == 0 and prepared.config.precision == "fp32"
    result = run.loop(prepared)
    assert capsys.readouterr().out == ""  # everything went to the log callable
    assert any(s.startswith("corpus: ") for s in lines) and any("held-out loss" in s for s in lines)
    assert not result.interrupted and result.step == 4 and result.adapter_dir is None
    assert _same(_params(tmp_path / "lib"), _params(tmp_path / "cli"))
    assert _same({k: v for k, v in _flat(result.params).items()}, _params(tmp_path / "cli"))
    state = json.loads((tmp_path / "lib" / "checkpoint" / "trainer_state.json").read_text())
    assert state["metrics"]["val_loss"] == result.metrics["val_loss"]
    assert set(state["args"]) == set(RunConfig().saved_args())  # the keys checkpoints always had

    split = RunConfig(**common, output_dir=str(tmp_path / "split"), stop_after=2)
    assert run.loop(run.prepare(split, "cpu", log=lines.append)).step == 2
    resumed = run.prepare(dataclasses.replace(split, stop_after=None, resume=""), "cpu", log=lines.append)
    assert resumed.start == 2
    assert run.loop(resumed).step == 4
    for name in ("params.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "cli" / "checkpoint" / name)
        assert _same(a, load_file(tmp_path / "split" / "checkpoint" / name)), name


def _flat(params):
    from aam_func import tree

    return tree.flatten(params)


def test_library_errors_are_run_errors(tmp_path, corpus):
    with pytest.raises(RunError, match="--seq-len 32 is above the model's maximum sequence length 16"):
        run.prepare(RunConfig(**TINY, data=str(corpus), max_seq_len=16, output_dir=str(tmp_path)), "cpu",
                    log=lambda s: None)
    with pytest.raises(RunError, match="invalid model configuration"):
        run.prepare(RunConfig(**{**TINY, "n_heads": 3}, data=str(corpus), output_dir=str(tmp_path)), "cpu",
                    log=lambda s: None)
    with pytest.raises(RunError, match="is not a checkpoint of aam-func train"):
        run.prepare(RunConfig(init_from=str(tmp_path / "none"), seq_len=None, output_dir=str(tmp_path)), "cpu")
    with pytest.raises(RunError, match="not a device"):
        run.resolve_device("gpu0")


def test_batch_size_must_divide_over_the_processes_and_says_where_it_came_from():
    RunConfig(batch_size=8).check_world_size(4)
    with pytest.raises(RunError, match=r"^--batch-size 8 is the global batch .* \(3\); use a multiple of 3$"):
        RunConfig(batch_size=8).check_world_size(3)
    with pytest.raises(RunError, match=r"^--batch-size 8 \(from the checkpoint\) is the global batch"):
        RunConfig(batch_size=8).check_world_size(3, from_checkpoint=True)


def test_run_submodules_are_not_shadowed_by_its_functions():
    """``run.prepare`` and ``run.loop`` are functions; no submodule has their names (a module
    hidden under a function cannot be reached as ``aam_func.run.<name>.<attr>``)."""
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(run.__path__):
        assert getattr(run, m.name) is importlib.import_module(f"aam_func.run.{m.name}"), m.name
    from aam_func.run import training

    assert callable(training._step) and run.loop is training.loop


def test_the_library_is_silent_unless_asked(tmp_path, corpus, capsys, monkeypatch):
    """No ``log``: no lines; no ``progress``: no bar, even on a terminal. The CLI asks for both."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the bar needs both
    cfg = RunConfig(**TINY, data=str(corpus), steps=2, output_dir=str(tmp_path / "quiet"))
    result = run.loop(run.prepare(cfg, "cpu"))
    assert result.step == 2 and capsys.readouterr() == ("", "")
    assert run.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "quiet2"))).step == 2
    assert capsys.readouterr() == ("", "")
    run.loop(run.prepare(dataclasses.replace(cfg, output_dir=str(tmp_path / "bar")), "cpu"), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "train: " in err  # the tqdm bar, on the (pretend) terminal
