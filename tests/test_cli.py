"""The aam-func command: train/generate/eval end to end, resume, Ctrl-C, and clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aam_func import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "300", "--sample-tokens", "0", "--precision", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")




def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "aam_func", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def test_train_generate_eval_end_to_end(tmp_path, corpus):
    out = tmp_path / "run"
    r = _run("train", "--data", str(corpus), "--steps", "3", "--eval-every", "2", "--output-dir", str(out),
             "--sample-tokens", "8", *TINY[:-4])
    assert r.returncode == 0, r.stderr
    assert "held-out loss" in r.stdout and "unigram baseline" in r.stdout and "sample:" in r.stdout
    assert "step 2: val loss" in r.stdout
    ck = out / "checkpoint"
    assert {"config.json", "params.safetensors", "optimizer.safetensors", "rng.safetensors",
            "trainer_state.json", "tokenizer"} <= set(os.listdir(ck))
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["metrics"]["val_perplexity"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in rec for rec in records) and any("val_loss" in rec for rec in records)

    r = _run("generate", "--checkpoint", str(out), "--prompt", "The with", "--prompt", "x", "--max-new-tokens", "5",
             "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- ") == 2 and "The with" in r.stdout
    again = _run("generate", "--checkpoint", str(out), "--prompt", "The with", "--prompt", "x", "--max-new-tokens", "5",
                 "--seed", "1")
    assert again.stdout == r.stdout  # seeded

    r = _run("eval", "--checkpoint", str(ck))
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("loss", "perplexity")))
    assert abs(float(lines["loss"]) - state["metrics"]["val_loss"]) < 1e-4


def test_resume_via_cli_is_bitwise(tmp_path, corpus):
    common = ["--data", str(corpus), "--eval-every", "0", *TINY, "--dropout", "0.1"]
    assert cli.main(["train", "--steps", "4", "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert cli.main(["train", "--steps", "4", "--stop-after", "2", "--output-dir", str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert cli.main(["train", "--steps", "4", "--resume", "--output-dir", str(tmp_path / "b"), *common]) == 0
    for name in ("params.safetensors", "optimizer.safetensors"):
        a, b = load_file(tmp_path / "a" / "checkpoint" / name), load_file(tmp_path / "b" / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_saves_a_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aam_func", "train", "--data", str(corpus), "--steps", "100000", "--eval-every", "0",
         "--output-dir", str(out), *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["step"] < 100000


def _error(capsys, argv, match):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--max-grad-norm", "--val-fraction", "--dropout",
                                  "--dist-timeout"])
def test_an_infinite_number_is_refused_at_parse_time_naming_the_flag(capsys, flag):
    """``--lr inf`` used to pass the parser and RunConfig and fail only after the tokenizer was
    trained, as an invalid *model* configuration naming learning_rate."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", flag, "inf"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"aam-func train: error: argument {flag}: "), err
    assert f"argument {flag}: expected a finite number" in err and "'inf'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # --lora-alpha too (parsed before the --lora-rank check)
        cli.main(["train", "--lora-alpha", "inf"])
    assert "argument --lora-alpha: expected a finite number" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys, corpus):
    out = ["--output-dir", str(tmp_path / "run")]
    _error(capsys, ["train", "--data", str(tmp_path / "missing"), *TINY, *out], "does not exist")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    _error(capsys, ["train", "--data", str(tmp_path / "empty.txt"), *TINY, *out], "is empty")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    _error(capsys, ["train", "--data", str(tmp_path / "bad.txt"), *TINY, *out], "bad.txt is not UTF-8")
    _error(capsys, ["train", "--data", str(corpus), *TINY, "--max-seq-len", "16", *out],
           "--seq-len 32 is above the model's maximum sequence length 16")
    _error(capsys, ["train", "--data", str(corpus), *TINY, "--tokenizer", "no-such-tokenizer-anywhere", *out],
           "not available offline")
    _error(capsys, ["train", "--data", str(corpus), *TINY, "--n-heads", "3", *out], "divisible by n_heads")
    _error(capsys, ["eval", "--checkpoint", str(tmp_path / "nothing")], "no checkpoint at")


def test_corrupted_or_truncated_checkpoint(tmp_path, capsys, corpus):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--steps", "1", "--eval-every", "0", "--output-dir", str(run),
                     *TINY]) == 0
    capsys.readouterr()
    _error(capsys, ["eval", "--checkpoint", str(run), "--seq-len", "64"], "above the model's maximum")
    assert cli.main(["eval", "--checkpoint", str(run)]) == 0  # the CLI prints the library's evaluation
    from aam_func import run as aam_run

    ev = aam_run.evaluate_checkpoint(str(run))
    assert capsys.readouterr().out.splitlines() == [
        f"data: the held-out split of {corpus} ({ev['tokens']:,} predicted tokens, {ev['blocks']} blocks of 32)",
        f"loss {ev['loss']:.4f}", f"perplexity {ev['perplexity']:.2f}"]
    import shutil

    no_tok = tmp_path / "no_tok"
    shutil.copytree(run / "checkpoint", no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    _error(capsys, ["generate", "--checkpoint", str(no_tok), "--prompt", "x"], "holds no tokenizer/ directory")
    _error(capsys, ["eval", "--checkpoint", str(no_tok)], "holds no tokenizer/ directory")
    params = run / "checkpoint" / "params.safetensors"
    size = params.stat().st_size
    with open(params, "r+b") as f:
        f.truncate(size - 100)
    _error(capsys, ["generate", "--checkpoint", str(run), "--prompt", "x"], "truncated or corrupted")
    with open(params, "wb") as f:
        f.write(b"not a safetensors file at all")
    _error(capsys, ["eval", "--checkpoint", str(run)], "truncated or corrupted")
    _error(capsys, ["train", "--resume", str(run), "--steps", "5", "--data", str(corpus), *TINY,
                    "--output-dir", str(run)], "truncated or corrupted")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    r = _run("train", "--data", str(tmp_path / "bad.txt"), "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = _run("generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr


def test_attention_backend_default_follows_precision():
    from aam_func.run import attention_backend

    assert attention_backend(None, "bf16", "cpu") == "math"
    assert attention_backend(None, "fp32", "cpu") == "auto"
    assert attention_backend(None, "bf16", "cuda") == "auto"
    assert attention_backend("sdpa", "bf16", "cpu") == "sdpa"
