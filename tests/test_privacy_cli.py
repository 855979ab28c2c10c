"""aam-func train --dp-*: private training from the CLI (Poisson sampling, ε reported and stored,
exact resume, the budget refused past its end, DP-LoRA) and its error paths."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli
from aam_func.run import RunConfig, RunError
from aam_func.run.privacy import PoissonLoader

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "8",
        "--vocab-size", "300", "--sample-tokens", "0", "--eval-every", "0", "--eval-batches", "2",
        "--attention-backend", "math"]
DP = ["--dp-epsilon", "8", "--dp-clip", "1.0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(argv):
    return cli.main(["train", *argv])


def _state(run):
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("dp") / "run"
    assert _train(["--data", str(corpus), "--steps", "4", "--log-every", "2", "--output-dir", str(out),
                   "--dp-accountant", "rdp", *DP, *TINY]) == 0
    return out


def test_a_dp_run_reports_and_stores_epsilon_within_the_target(dp_run):
    eps = [r["epsilon"] for r in _records(dp_run) if "epsilon" in r]
    assert len(eps) >= 2 and eps == sorted(eps) and 0 < eps[-1] <= 8.0
    dp = _state(dp_run)["dp"]
    assert dp["accountant"] == "rdp" and dp["history"][0][2] == 4 and dp["epsilon"] == pytest.approx(eps[-1])
    assert dp["epsilon"] <= 8.0 and 0 < dp["delta"] < 1 / dp["n_blocks"]
    assert _state(dp_run)["metrics"]["epsilon"] == pytest.approx(dp["epsilon"])


def test_resuming_a_spent_budget_is_refused(dp_run, capsys):
    assert _train(["--output-dir", str(dp_run), "--resume", "--steps", "6", *TINY[-8:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the privacy budget is spent")


def test_an_interrupted_dp_run_resumes_exactly(tmp_path, corpus):
    """Poisson batches and noise are functions of (seed, step): stop after 2 of 4 steps and resume
    gives the uninterrupted run's params."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--data", str(corpus), "--steps", "4", "--dp-accountant", "gdp", *DP, *TINY]
    assert _train([*common, "--output-dir", str(whole)]) == 0
    assert _train([*common, "--output-dir", str(split), "--stop-after", "2"]) == 0
    assert _train(["--output-dir", str(split), "--resume", "--steps", "4", "--sample-tokens", "0",
                   "--eval-batches", "2"]) == 0
    a = load_file(whole / "checkpoint" / "params.safetensors")
    b = load_file(split / "checkpoint" / "params.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert _state(split)["dp"]["history"] == _state(whole)["dp"]["history"]


def test_dp_lora_fine_tunes_the_adapters(tmp_path, corpus, dp_run, capsys):
    out = tmp_path / "lora"
    assert _train(["--data", str(corpus), "--init-from", str(dp_run), "--lora-rank", "2", "--steps", "2",
                   "--output-dir", str(out), "--batch-size", "8", "--sample-tokens", "0", "--eval-batches", "2",
                   "--dp-accountant", "gdp", *DP]) == 0
    assert "LoRA parameters" in capsys.readouterr().out
    assert _state(out)["dp"]["epsilon"] <= 8.0


@pytest.mark.parametrize("flags, message", [
    (["--dp-epsilon", "0"], "--dp-epsilon"),
    (["--dp-epsilon", "-1"], "--dp-epsilon"),
    (["--dp-epsilon", "2", "--dp-clip", "0"], "--dp-clip"),
    (["--dp-epsilon", "2", "--dp-delta", "1.5"], "--dp-delta"),
])
def test_bad_dp_numbers_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        _train(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aam-func train: error: argument " + message)


def test_delta_of_one_over_n_is_refused_in_one_line(tmp_path, corpus, capsys):
    assert _train(["--data", str(corpus), "--steps", "2", "--output-dir", str(tmp_path / "r"), "--dp-epsilon", "2",
                   "--dp-delta", "0.5", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dp-delta 0.5 must be below 1/N")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp_delta=1e-6), "--dp-delta only apply with --dp-epsilon"),
    (dict(dp_epsilon=1.0, accumulate=2), "--accumulate"),
    (dict(dp_epsilon=1.0, precision="bf16"), "--precision bf16"),
    (dict(dp_epsilon=1.0, dropout=0.1), "--dropout"),
    (dict(dp_epsilon=1.0, compile=True), "--compile"),
    (dict(dp_epsilon=1.0, dp_accountant="moments"), "dp_accountant"),
    (dict(dp_epsilon=1.0, dp_adaptive_clip=1.0), "dp_adaptive_clip"),
    (dict(dp_epsilon=0.0), "dp_epsilon"),
    (dict(dp_epsilon=1.0, dp_clip=-1.0), "dp_clip"),
])
def test_dp_settings_that_cannot_work_are_run_errors(kwargs, message):
    with pytest.raises(RunError, match=message):
        RunConfig(**kwargs)


def test_poisson_batches_are_a_pure_function_of_seed_and_step():
    blocks = torch.arange(400 * 4).view(400, 4)
    a, b = PoissonLoader(blocks, 40, seed=3), PoissonLoader(blocks, 40, seed=3)
    for step in (0, 7, 123):
        torch.testing.assert_close(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    assert not torch.equal(a.indices(0), a.indices(1))
    sizes = torch.tensor([len(a.indices(s)) for s in range(200)], dtype=torch.float64)
    assert abs(sizes.mean().item() - 40) < 3 * (40 * 0.9 / 200) ** 0.5 + 0.5  # E|B| = qN
    # processes split each global batch into disjoint shares whose union is the one-process batch
    shares = [PoissonLoader(blocks, 40, seed=3, rank=r, world_size=3).batch(5)["input_ids"] for r in range(3)]
    whole = a.batch(5)["input_ids"]
    assert sorted(torch.cat(shares)[:, 0].tolist()) == sorted(whole[:, 0].tolist())


def test_adaptive_clip_moves_the_clip_norm_and_is_recorded(tmp_path, corpus, capsys):
    out = tmp_path / "adaptive"
    assert _train(["--data", str(corpus), "--steps", "3", "--log-every", "1", "--output-dir", str(out),
                   "--dp-accountant", "gdp", "--dp-adaptive-clip", "0.5", *DP, *TINY, "--batch-size", "16"]) == 0
    assert "adaptive clip norm from 1 tracking the 0.5 quantile" in capsys.readouterr().out
    clips = [r["dp_clip"] for r in _records(out) if "dp_clip" in r]
    assert clips[0] == 1.0 and len(set(clips)) > 1  # the norm used at step 1 is --dp-clip, then it moves


def test_adaptive_clip_without_room_for_the_count_noise_is_refused(tmp_path, corpus, capsys):
    # count noise is batch/20 = 0.4 here, and a tight epsilon needs sigma above 2 x 0.4
    assert _train(["--data", str(corpus), "--steps", "2000", "--output-dir", str(tmp_path / "r"), "--dp-epsilon", "0.2",
                   "--dp-accountant", "gdp", "--dp-adaptive-clip", "0.5", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dp-adaptive-clip: count_noise must exceed")
