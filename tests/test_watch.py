"""Watching a run: TensorBoard event files, ``aam-func plot`` figures, and both optional
dependencies absent (training goes on; plot says what to install)."""

import json
import os
import sys
import xml.etree.ElementTree as ET

import pytest

from aam_func import cli
from aam_func.run.output import TENSORBOARD_TAGS, MetricsLog

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "300", "--sample-tokens", "0", "--eval-batches", "2", "--log-every", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Two short runs, the first with TensorBoard on: 6 steps with an evaluation at 3 and 6."""
    root = tmp_path_factory.mktemp("watch")
    a, b = root / "a", root / "b"
    assert cli.main(["train", "--data", str(corpus), "--steps", "6", "--eval-every", "3", "--output-dir", str(a),
                     "--log-to", "tensorboard", *TINY]) == 0
    assert cli.main(["train", "--data", str(corpus), "--steps", "4", "--eval-every", "2", "--output-dir", str(b),
                     "--tokenizer", str(a / "tokenizer"), "--batch-size", "8", *TINY]) == 0
    return a, b


def test_event_files_hold_every_tag_at_every_logged_step(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = runs
    events = EventAccumulator(str(a / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(TENSORBOARD_TAGS.values())
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/perplexity")] == [3, 6]
    records = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    clipped = [e.value for e in events.Scalars("train/grad_norm_clipped")]
    assert all(c <= 1.0 + 1e-6 for c in clipped)  # --max-grad-norm 1.0
    assert "run/config/text_summary" in events.Tags()["tensors"]
    assert not (b / "tensorboard").exists()  # --log-to jsonl (the default): metrics.jsonl only


def test_plot_writes_a_png_and_an_svg_of_two_runs(runs, tmp_path, capsys):
    import matplotlib.image

    a, b = runs
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(a), str(b), "--metric", "loss,val_loss,val_perplexity", "--output", str(png)]) == 0
    image = matplotlib.image.imread(str(png))
    assert image.shape[0] > 600 and image.shape[1] > 400 and image[..., :3].std() > 0.05  # three panels, not blank
    svg = tmp_path / "curves.svg"
    assert cli.main(["plot", str(a), str(b), "--x", "tokens", "--output", str(svg)]) == 0
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and len(list(root.iter())) > 50
    assert capsys.readouterr().out.splitlines() == [str(png), str(svg)]


@pytest.mark.parametrize("argv,needle", [
    (["plot", "{tmp}"], "is not a run directory of aam-func train"),
    (["plot", "{a}", "--metric", "nope"], "no run has the metric 'nope'; recorded:"),
    (["plot", "{a}", "--output", "{tmp}/x.jpg"], "must end in one of .png, .svg, .pdf"),
    (["plot", "{a}", "--metric", ","], "names no metric"),
])
def test_plot_errors_are_one_line(runs, tmp_path, capsys, argv, needle):
    a, _ = runs
    code = cli.main([x.format(tmp=tmp_path, a=a) for x in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_without_tensorboard_training_goes_on_with_a_notice(tmp_path, corpus, runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it now fails
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--steps", "1", "--output-dir", str(out), "--log-to",
                     "tensorboard", "--tokenizer", str(runs[0] / "tokenizer"), *TINY]) == 0
    assert "the tensorboard package is not installed (pip install 'aam-func[tensorboard]')" in capsys.readouterr().out
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_without_matplotlib_plot_says_what_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code = cli.main(["plot", str(runs[0]), "--output", str(tmp_path / "c.png")])
    assert code == 2 and "pip install 'aam-func[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_only_the_writing_rank_writes(tmp_path):
    log = MetricsLog(str(tmp_path), log_to="tensorboard", writes=False)
    log.record({"step": 1, "loss": 1.0})
    log.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stdout_tty,stderr_tty,bar", [(True, True, True), (False, True, False), (True, False, False)])
def test_the_bar_only_when_stdout_is_a_terminal(monkeypatch, stdout_tty, stderr_tty, bar):
    """`aam-func train > log.txt` keeps the plain progress lines in the file (no bar on stderr)."""
    from types import SimpleNamespace

    from aam_func.run.training import _Progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty, raising=False)
    run = SimpleNamespace(is_main=True, start=0, config=SimpleNamespace(log_every=None))
    progress = _Progress(run, 10, show_bar=True)
    progress.bar.close()
    assert progress.use_bar is bar
