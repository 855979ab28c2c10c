"""aam-func train --init-from / --lora-*: full and LoRA fine-tuning of a checkpoint from the CLI."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "300", "--sample-tokens", "0", "--precision", "fp32"]
RUN = ["--batch-size", "4", "--sample-tokens", "0", "--precision", "fp32", "--eval-every", "0"]  # no model flags


pytestmark = pytest.mark.usefixtures("one_thread")




def _train(argv):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["train", *argv])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A 3-step tiny run (learnable positions: GPT-2-shaped, so PEFT files can be written)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert _train(["--data", str(corpus), "--steps", "3", "--eval-every", "0", "--output-dir", str(out), *TINY]) == 0
    return out


def _state(run):
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())


def _step0_val_loss(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in recs if r.get("step") == 0 and "val_loss" in r)


def test_lora_changes_only_the_targeted_weights(tmp_path, corpus, base, capsys):
    out = tmp_path / "lora"
    assert _train(["--data", str(corpus), "--init-from", str(base), "--lora-rank", "4", "--lora-targets",
                   "*.attn.qkv", "--steps", "3", "--output-dir", str(out), *RUN]) == 0
    stdout = capsys.readouterr().out
    assert "trainable: 512 LoRA parameters" in stdout and "blocks.0.attn.qkv" in stdout  # A 4x32 + B 96x4

    # B starts at zero: the starting point is the base model. (Not bit-equal: the LoRA run's loss
    # goes through the adapter's TorchFunctionMode, under which the LM-head cross-entropy takes
    # its whole-logits composite instead of the fused chunked op; they agree to rounding.)
    assert _step0_val_loss(out) == pytest.approx(_state(base)["metrics"]["val_loss"], rel=1e-6, abs=0)
    before = load_file(base / "checkpoint" / "params.safetensors")
    after = load_file(out / "checkpoint" / "params.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        if k == "blocks.0.attn.qkv.weight":
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k
    assert not os.path.exists(out / "checkpoint" / "optimizer.safetensors")
    st = _state(out)
    assert st["lora"]["rank"] == 4 and st["lora"]["alpha"] == 8.0 and st["lora"]["targets"] == ["blocks.0.attn.qkv"]

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["transformer.h.0.attn.c_attn"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()

    # the merged checkpoint is an ordinary one: generate and eval work unchanged
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("loss"))
    assert abs(float(lines["loss"]) - st["metrics"]["val_loss"]) < 1e-4  # merged == factored


def test_lora_adapters_without_a_transformers_equivalent(tmp_path, corpus, capsys):
    base = tmp_path / "rope"
    assert _train(["--data", str(corpus), "--steps", "1", "--eval-every", "0", "--output-dir", str(base),
                   "--position-encoding", "rope", *TINY]) == 0
    out = tmp_path / "lora"
    assert _train(["--data", str(corpus), "--init-from", str(base), "--lora-rank", "2", "--lora-dropout", "0.1",
                   "--steps", "2", "--output-dir", str(out), *RUN]) == 0
    assert "not PEFT files" in capsys.readouterr().out
    ad = load_file(out / "adapter" / "adapters.safetensors")
    assert set(ad) == {f"blocks.0.attn.{m}.lora_{x}" for m in ("qkv", "out") for x in "AB"}
    assert json.loads((out / "adapter" / "lora.json").read_text())["rank"] == 2


def test_full_fine_tune_starts_from_the_checkpoint(tmp_path, corpus, base):
    out = tmp_path / "ft"
    # no --seq-len: the checkpoint's (32) is the default
    assert _train(["--data", str(corpus), "--init-from", str(base / "checkpoint"), "--steps", "2",
                   "--output-dir", str(out), *RUN]) == 0
    assert _step0_val_loss(out) == _state(base)["metrics"]["val_loss"]
    st = _state(out)
    assert st["step"] == 2 and st["init_from"] == str(base / "checkpoint") and st["args"]["seq_len"] == 32
    assert json.loads((out / "checkpoint" / "config.json").read_text())["d_model"] == 32
    assert os.path.exists(out / "checkpoint" / "optimizer.safetensors")  # resumable like any run
    opt = load_file(out / "checkpoint" / "optimizer.safetensors")
    assert any(k.endswith("count") and int(v) == 2 for k, v in opt.items())  # fresh state: 2 updates, not 5


def _error(capsys, argv, match):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


def test_fine_tuning_errors(tmp_path, corpus, base, capsys):
    t = ["train", "--data", str(corpus), "--output-dir", str(tmp_path / "run"), *RUN]
    ini = ["--init-from", str(base)]
    _error(capsys, [*t, "--init-from", str(tmp_path / "missing")], "no checkpoint at")
    (tmp_path / "empty").mkdir()
    _error(capsys, [*t, "--init-from", str(tmp_path / "empty")], "--init-from")
    for bad in ("0", "-3", "1.5"):  # refused by the parser, as every integer flag of train is
        with pytest.raises(SystemExit) as e:
            cli.main([*t, *ini, "--lora-rank", bad])
        assert e.value.code == 2
        assert f"argument --lora-rank: expected a positive integer, got '{bad}'" in capsys.readouterr().err
    _error(capsys, [*t, *ini, "--lora-rank", "64"], "exceeds min(in, out) = 32")
    _error(capsys, [*t, *ini, "--lora-rank", "2", "--lora-targets", "*.nothing,also_not"], "available: ")
    _error(capsys, [*t, *ini, "--lora-rank", "2", "--lora-targets", "*.nothing"], "blocks.0.mlp.fc")
    _error(capsys, [*t, "--lora-rank", "2"], "--lora-rank needs --init-from")
    _error(capsys, [*t, *ini, "--lora-alpha", "4"], "--lora-alpha only apply with --lora-rank")
    _error(capsys, [*t, *ini, "--d-model", "64", "--n-layers", "1"], "--d-model, --n-layers cannot be combined")
    _error(capsys, [*t, *ini, "--vocab-size", "300"], "--vocab-size cannot be combined")
    _error(capsys, [*t, *ini, "--resume"], "give one of them")
    _error(capsys, [*t, *ini, "--lora-rank", "2", "--resume"], "cannot be resumed")
    _error(capsys, [*t, *ini, "--lora-rank", "2", "--stop-after", "1"], "cannot be resumed")


def test_resuming_a_lora_checkpoint_is_refused(tmp_path, corpus, base, capsys):
    out = tmp_path / "lora"
    assert _train(["--data", str(corpus), "--init-from", str(base), "--lora-rank", "1", "--steps", "1",
                   "--output-dir", str(out), *RUN]) == 0
    capsys.readouterr()
    _error(capsys, ["train", "--data", str(corpus), "--resume", "--steps", "3", "--output-dir", str(out), *RUN],
           "--init-from")


def test_lora_dropout_draws_from_a_generator_per_step_and_rank(tmp_path, corpus, base, monkeypatch):
    """LoRA dropout > 0 with model dropout 0: the step still gets the per-(seed, step, rank)
    generator. Without it the masks came from torch's global RNG, seeded alike on every rank."""
    from aam_func import run, train
    from aam_func.config import ModelConfig
    from aam_func.run import training as run_loop

    cfg = run.RunConfig(data=str(corpus), init_from=str(base), lora_rank=2, lora_dropout=0.5, dropout=0.0, seq_len=None,
                        steps=1, batch_size=4, sample_tokens=0, precision="fp32", eval_every=0,
                        output_dir=str(tmp_path / "out"))
    prepared = run.prepare(cfg, "cpu", log=lambda s: None)
    assert prepared.model_config.dropout == 0 and prepared.needs_dropout_generator
    calls = []

    def spy(trainable, opt_state, batch, *gen):
        calls.append(gen)
        return prepared.train_step(trainable, opt_state, batch, *gen)

    import dataclasses
    run_loop._step(dataclasses.replace(prepared, train_step=spy), prepared.trainable, prepared.opt_state, 0)
    assert len(calls) == 1 and len(calls[0]) == 1 and isinstance(calls[0][0], torch.Generator)

    # the one rule, shared with compat's pipeline, and generators that differ between ranks
    plain = ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, dropout=0.0)
    assert not train.needs_dropout_generator(plain) and train.needs_dropout_generator(plain, 0.5)
    assert train.needs_dropout_generator(plain.replace(dropout=0.1))
    draws = [torch.rand(4, generator=train.dropout_generator(0, 3, "cpu", rank)) for rank in (0, 1)]
    assert not torch.equal(*draws)
