"""A run never loses a good model: divergence, overwrites, signals, locks, resume flags, loading
checks and one ``error:`` line for every fault (docs/reliability.md says which test holds which
promise). Each test reproduces a defect found by a fault campaign, then holds the fix."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from aam_func import ModelConfig, Transformer, cli, optim, tree
from aam_func.checkpoint import CheckpointError, kept_checkpoints, load_checkpoint, save_checkpoint
from aam_func.run import RunConfig, RunError
from aam_func.train import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "300", "--sample-tokens", "0", "--eval-every", "0", "--eval-batches", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus):
    """A trained tokenizer directory, so that each run below skips BPE training."""
    out = tmp_path_factory.mktemp("tok") / "run"
    assert cli.main(["train", "--data", str(corpus), "--steps", "1", "--output-dir", str(out), *TINY]) == 0
    return str(out / "tokenizer")


def _args(corpus, tok, out, *extra):
    return ["train", "--data", str(corpus), "--tokenizer", tok, "--output-dir", str(out), *TINY, *extra]


def _error(capsys, argv, *needles):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _no_temporaries(directory):
    left = [n for n in os.listdir(directory) if ".tmp-" in n or ".old-" in n]
    assert not left, left


# ----------------------------------------------------------------------------- 1, 8: divergence


def _tiny_model():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    return cfg, Transformer(cfg)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_non_finite_step_changes_nothing_and_is_reported(precision):
    """Item 8: one overflowing batch used to make every fp32/bf16 parameter NaN."""
    cfg, model = _tiny_model()
    params = model.init(seed=0)

    def loss_fn(p, batch):
        return model.apply(p, batch["input_ids"], labels=batch["input_ids"])["loss"] * batch["poison"]

    step = make_train_step(loss_fn, optim.adamw(1e-2), precision=precision)
    state = step.init(params)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    new, new_state, m = step(params, state, {"input_ids": ids, "poison": torch.tensor(float("inf"))})
    assert bool(m["skipped"])
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(new)))
    assert all(torch.isfinite(x).all() for x in tree.leaves(new_state) if x.is_floating_point())
    new, _, m = step(new, new_state, {"input_ids": ids, "poison": torch.tensor(1.0)})
    assert not bool(m["skipped"]) and not all(torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(new)))


def test_skip_nonfinite_false_applies_the_update_as_computed():
    cfg, model = _tiny_model()
    params = model.init(seed=0)
    step = make_train_step(lambda p, b: model.apply(p, b["input_ids"], labels=b["input_ids"])["loss"] * b["poison"],
                           optim.sgd(1e-2), skip_nonfinite=False)
    ids = torch.randint(0, 64, (2, 8))
    new, _, m = step(params, step.init(params), {"input_ids": ids, "poison": torch.tensor(float("nan"))})
    assert bool(m["skipped"]) and not torch.isfinite(tree.leaves(new)[0]).all()
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        make_train_step(lambda p, b: 0, optim.sgd(1e-2), skip_nonfinite="yes")


def test_a_diverging_run_keeps_finite_checkpoints_and_says_why(tmp_path, capsys, corpus, tok):
    """Item 1: --lr 1e6 --save-every 1 used to overwrite the checkpoint with NaN params and tell
    an fp32 run to use fp32."""
    out = tmp_path / "nan"
    err = _error(capsys, _args(corpus, tok, out, "--steps", "100", "--lr", "1e6", "--precision", "fp32",
                               "--save-every", "1", "--max-skipped-steps", "3"),
                 "not finite for 4 steps in a row", "--max-skipped-steps 3", "lower --lr")
    assert "--precision fp32" not in err
    ck = load_checkpoint(out)  # finite (load_checkpoint refuses NaN) and resumable
    assert all(torch.isfinite(t).all() for t in tree.leaves(ck.params))
    kept = kept_checkpoints(out / "checkpoint")
    assert len(kept) == 1 and load_checkpoint(kept[0]).step == ck.step - 1  # --keep-checkpoints 2
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_in_a_row"] for r in records if r.get("skipped")][-4:] == [1, 2, 3, 4]
    # the run goes on from it with a lower learning rate (an adjustable setting on --resume)
    assert cli.main(_args(corpus, tok, out, "--steps", str(ck.step + 2), "--lr", "1e-3", "--resume")) == 0
    assert load_checkpoint(out).step == ck.step + 2


def test_bf16_and_fp16_divergence_advice_fits_the_precision(tmp_path, capsys, corpus, tok):
    err = _error(capsys, _args(corpus, tok, tmp_path / "b", "--steps", "60", "--lr", "1e6", "--precision", "bf16",
                               "--max-skipped-steps", "0"), "not finite for 1 steps in a row")
    assert "bf16 has float32's range" in err


def test_save_refuses_non_finite_params_and_keeps_the_previous(tmp_path):
    cfg, model = _tiny_model()
    params = model.init(seed=0)
    save_checkpoint(tmp_path / "ck", cfg=cfg, params=params, step=1)
    bad = tree.map(lambda t: t.clone(), params)
    tree.leaves(bad)[1][0] = float("nan")
    with pytest.raises(CheckpointError, match="inf/NaN in its params"):
        save_checkpoint(tmp_path / "ck", cfg=cfg, params=bad, step=2)
    with pytest.raises(CheckpointError, match="inf/NaN in its optimizer state"):
        save_checkpoint(tmp_path / "ck", cfg=cfg, params=params, step=2,
                        opt_state={"m": torch.tensor([float("inf")])})
    assert load_checkpoint(tmp_path / "ck").step == 1
    _no_temporaries(tmp_path)


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    cfg, model = _tiny_model()
    params = model.init(seed=0)
    for step in range(1, 6):
        save_checkpoint(tmp_path / "ck", cfg=cfg, params=params, step=step, keep=3)
    assert [os.path.basename(p) for p in kept_checkpoints(tmp_path / "ck")] == ["ck-4", "ck-3"]
    assert load_checkpoint(tmp_path / "ck").step == 5 and load_checkpoint(tmp_path / "ck-3").step == 3
    save_checkpoint(tmp_path / "ck", cfg=cfg, params=params, step=6)  # keep=1: no copies beside it
    assert kept_checkpoints(tmp_path / "ck") == []
    with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
        save_checkpoint(tmp_path / "ck", cfg=cfg, params=params, step=7, keep=0)


# ----------------------------------------------------------------------------- 2, 6: the run directory


def test_a_fresh_run_never_replaces_an_existing_one(tmp_path, capsys, corpus, tok):
    """Item 2: a second run in the same --output-dir used to delete the first's checkpoint and
    mix both runs' metrics."""
    out = tmp_path / "run"
    assert cli.main(_args(corpus, tok, out, "--steps", "2")) == 0
    before = load_file(out / "checkpoint" / "params.safetensors")
    _error(capsys, _args(corpus, tok, out, "--steps", "3"), "already holds a run", "--resume", "--overwrite")
    after = load_file(out / "checkpoint" / "params.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cli.main(_args(corpus, tok, out, "--steps", "3", "--overwrite")) == 0
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3 and steps.count(1) == 1  # the old run's records are gone
    _error(capsys, _args(corpus, tok, out, "--steps", "4", "--resume", "--overwrite"), "give one of them")
    _error(capsys, ["train", "--data", str(corpus), "--output-dir", str(out), "--init-from", str(out), "--overwrite",
                    "--steps", "4"], "lies inside --output-dir")


def test_resume_drops_the_metrics_of_steps_it_takes_again(tmp_path, corpus, tok):
    out = tmp_path / "run"
    assert cli.main(_args(corpus, tok, out, "--steps", "4", "--stop-after", "2")) == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # a killed run's steps after its save
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert cli.main(_args(corpus, tok, out, "--steps", "4", "--resume")) == 0
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r].count(3) == 1 and {"step": 3, "loss": 9.0} not in records


def _spawn(argv, **env):
    return subprocess.Popen([sys.executable, "-m", "aam_func", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(**env), cwd=ROOT)


def _wait_for_training(proc, out, timeout=120):
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()


def test_a_second_run_in_a_locked_directory_is_refused(tmp_path, capsys, corpus, tok):
    """Item 6: two runs in one directory used to delete each other's temporary checkpoint."""
    out = tmp_path / "run"
    proc = _spawn(_args(corpus, tok, out, "--steps", "100000"))
    try:
        _wait_for_training(proc, out)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        _error(capsys, _args(corpus, tok, out, "--steps", "5", "--resume"), "is in use by another run",
               f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (out / ".lock").exists()  # released at the end


def test_a_stale_lock_is_taken_over(tmp_path, corpus, tok):
    """A lock file left by a killed run (its flock died with it) does not block the next run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "started": "then"}))
    assert cli.main(_args(corpus, tok, out, "--steps", "1")) == 0


# ----------------------------------------------------------------------------- 5: signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_and_exit_with_the_conventional_status(tmp_path, corpus, tok, sig):
    """Item 5: SIGTERM (timeout, docker, Kubernetes, SLURM) used to kill a run without a save."""
    out = tmp_path / "run"
    proc = _spawn(_args(corpus, tok, out, "--steps", "100000"))
    _wait_for_training(proc, out)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert 0 < load_checkpoint(out).step < 100000
    _no_temporaries(out)


def test_repeated_ctrl_c_leaves_no_traceback_and_no_temporaries(tmp_path, corpus, tok):
    """Item 11: a second Ctrl-C during the save used to print a shutdown traceback and leave a
    stale checkpoint.old-PID."""
    out = tmp_path / "run"
    proc = _spawn(_args(corpus, tok, out, "--steps", "100000", "--save-every", "1"))
    _wait_for_training(proc, out)
    for _ in range(6):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    load_checkpoint(out)
    _no_temporaries(out)


# ----------------------------------------------------------------------------- 7: flags with --resume


def test_resume_refuses_flags_that_would_change_the_run_and_honours_the_rest(tmp_path, capsys, corpus, tok):
    """Item 7: --resume used to ignore --d-model 64 and --data without a word."""
    out = tmp_path / "run"
    assert cli.main(_args(corpus, tok, out, "--steps", "4", "--stop-after", "2")) == 0
    _error(capsys, _args(corpus, tok, out, "--steps", "4", "--resume", "--d-model", "64"),
           "--d-model 64 (the run has 32)")
    other = tmp_path / "other.txt"
    other.write_text("other text " * 200, encoding="utf-8")
    _error(capsys, [*_args(corpus, tok, out, "--steps", "4", "--resume"), "--data", str(other)], "--data")
    _error(capsys, _args(corpus, tok, out, "--steps", "4", "--resume", "--seed", "5"), "--seed 5 (the run has 0)")
    # the same values are not a change; steps and cadence are honoured
    assert cli.main(_args(corpus, tok, out, "--steps", "5", "--resume", "--d-model", "32", "--save-every", "1")) == 0
    assert load_checkpoint(out).step == 5


def test_library_configs_count_non_default_fields_as_explicit():
    assert RunConfig(lr=0.5).explicit_fields() == {"lr"}
    assert RunConfig.from_flags({"lr": 2e-3, "steps": 9}, given={"lr"}).explicit_fields() == {"lr"}


# ----------------------------------------------------------------------------- 10: loading checks


def _saved(tmp_path, transform):
    cfg, model = _tiny_model()
    path = tmp_path / "ck"
    save_checkpoint(path, cfg=cfg, params=model.init(seed=0), step=1)
    flat = load_file(path / "params.safetensors")
    save_file(transform(flat), path / "params.safetensors", metadata={"format": "aam_func.params"})
    return path


def test_loading_refuses_nan_weights_and_wrong_dtypes(tmp_path, capsys):
    """Item 10: a NaN checkpoint evaluated to `loss nan` with exit 0; int64 and mixed-dtype
    params passed validation and failed deep in torch."""
    name = "embed.weight"
    nan = _saved(tmp_path / "a", lambda f: {**f, name: torch.full_like(f[name], float("nan"))})
    with pytest.raises(CheckpointError, match=f"'{name}' holds inf/NaN"):
        load_checkpoint(nan)
    _error(capsys, ["eval", "--checkpoint", str(nan)], "holds inf/NaN")
    ints = _saved(tmp_path / "b", lambda f: {**f, name: f[name].long()})
    with pytest.raises(CheckpointError, match="is torch.int64, expected a floating-point tensor"):
        load_checkpoint(ints)
    mixed = _saved(tmp_path / "c", lambda f: {**f, name: f[name].half()})
    with pytest.raises(CheckpointError, match="mix dtypes"):
        load_checkpoint(mixed)
    half = _saved(tmp_path / "d", lambda f: {k: v.half() for k, v in f.items()})
    assert load_checkpoint(half).params["embed"]["weight"].dtype == torch.float16  # one dtype: fine


@pytest.mark.parametrize("edit,needle", [
    ({"step": "12"}, "step must be an int >= 0"), ({"step": -1}, "step must be an int >= 0"),
    ({"args": [1, 2]}, "args must be a JSON object"), ({"metrics": "x"}, "metrics must be a JSON object"),
    ({"seed": 1.5}, "seed must be an int"), ({"format_version": 99}, "format_version 99"),
])
def test_a_hand_edited_trainer_state_is_a_clear_error(tmp_path, capsys, edit, needle):
    cfg, model = _tiny_model()
    save_checkpoint(tmp_path / "ck", cfg=cfg, params=model.init(seed=0), step=1, train_state={"args": {}})
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    (tmp_path / "ck" / "trainer_state.json").write_text(json.dumps({**state, **edit}))
    _error(capsys, ["eval", "--checkpoint", str(tmp_path / "ck")], needle)


def test_resume_with_invalid_saved_arguments_is_a_clear_error(tmp_path, capsys, corpus, tok):
    out = tmp_path / "run"
    assert cli.main(_args(corpus, tok, out, "--steps", "3", "--stop-after", "1")) == 0
    path = out / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["args"]["lr"] = "fast"
    path.write_text(json.dumps(state))
    _error(capsys, _args(corpus, tok, out, "--steps", "3", "--resume"), "saved training arguments are invalid",
           "lr must be")


# ----------------------------------------------------------------------------- 11: one error line


def test_output_dir_faults_are_one_error_line(tmp_path, capsys, corpus, tok):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _error(capsys, _args(corpus, tok, afile, "--steps", "1"), "is a file, not a directory")
    _error(capsys, _args(corpus, tok, afile / "sub", "--steps", "1"), "cannot be created")
    _error(capsys, _args(corpus, tok, "/proc/aam-func-no-such-dir", "--steps", "1"), "cannot be created")


def test_seed_and_device_faults_are_one_error_line(tmp_path, capsys, corpus, tok):
    out = tmp_path / "run"
    _error(capsys, _args(corpus, tok, out, "--steps", "1", "--seed", str(2**64)), "seed must be an int in")
    _error(capsys, _args(corpus, tok, out, "--steps", "1", "--device", "meta"), "--device 'meta' is not supported")
    _error(capsys, _args(corpus, tok, out, "--steps", "1", "--device", "nonsense"), "is not a device")
    assert cli.main(_args(corpus, tok, out, "--steps", "1", "--seed", str(2**64 - 1))) == 0


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
from aam_func import cli
limit = int(sys.argv[1])
argv = sys.argv[2:]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(cli.main(argv))
"""


def test_a_full_disk_during_a_checkpoint_is_one_error_line_and_leaves_nothing_behind(tmp_path, corpus, tok):
    """Item 11: a full disk used to end in a traceback and leave checkpoint.tmp-PID behind. The
    file-size limit makes every write past 20 kB fail as a full disk would (the resumed run
    writes nothing else: its data and tokenizer are prepared)."""
    out = tmp_path / "run"
    assert cli.main(_args(corpus, tok, out, "--steps", "3", "--stop-after", "1")) == 0
    before = load_file(out / "checkpoint" / "params.safetensors")
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK)
    r = subprocess.run([sys.executable, str(script), "20000", *_args(corpus, tok, out, "--steps", "3", "--resume")],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: could not write the checkpoint") and "Traceback" not in r.stderr, r.stderr
    assert "the previous checkpoint, if any, is unchanged" in r.stderr
    after = load_file(out / "checkpoint" / "params.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    _no_temporaries(out)


def test_bpe_training_cuts_words_longer_than_max_word():
    """Item 11: 2 MB of text without whitespace made BPE training run for minutes (its cost
    grows with the longest word). Runs longer than MAX_WORD are cut before training; ordinary
    text pre-tokenizes exactly as before."""
    from tokenizers import pre_tokenizers

    from aam_func.tokenizer import MAX_WORD, Tokenizer

    tok = Tokenizer.train_bpe(["a" * 200_000, "hello world " * 50], 300)
    pieces = tok.hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str("b" * (2 * MAX_WORD + 7) + " next")
    assert [len(p) for p, _ in pieces] == [MAX_WORD, MAX_WORD, 7, len("Ġnext")]
    text = "The with statement: def f(x): return x ** 2  # a comment, (parens) and 3.14"
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert tok.hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == plain
    assert tok.decode(tok(text)["input_ids"][0]) == text


def test_a_fifo_or_a_device_as_data_is_one_error_line(tmp_path, capsys):
    """Item 11: --data /dev/zero ran out of memory and a FIFO hung the run."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    _error(capsys, ["train", "--data", str(fifo), "--output-dir", str(tmp_path / "run"), *TINY, "--steps", "1"],
           str(fifo), "is not a regular file (a pipe, device or socket)")
    _error(capsys, ["train", "--data", "/dev/zero", "--output-dir", str(tmp_path / "run"), *TINY, "--steps", "1"],
           "/dev/zero", "expected a .txt, .md, .jsonl or .parquet file or a folder")


def test_a_full_disk_while_preparing_the_data_is_one_error_line_and_leaves_nothing_behind(tmp_path, corpus):
    """Item 11: a full disk while the token data was written used to leave a temporary behind."""
    out = tmp_path / "run"
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK)
    r = subprocess.run([sys.executable, str(script), "100000", "train", "--data", str(corpus), "--output-dir", str(out),
                        *TINY, "--steps", "1"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
