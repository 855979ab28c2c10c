"""examples/influence.py at a tiny size: it trains, scores every block and prints the top five;
an unknown --method is refused by argparse."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("influence_example", os.path.join(ROOT, "examples", "influence.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_influence_example_runs_and_ranks(capsys):
    ex = load_example()
    tiny = ["--steps", "3", "--blocks", "24", "--fit", "8", "--d-model", "32", "--layers", "1", "--seq-len", "16"]
    scores = ex.main(tiny)
    assert scores.shape == (24,) and torch.isfinite(scores).all()
    out = capsys.readouterr().out
    assert "query (held out)" in out and "#5 score" in out
    with pytest.raises(SystemExit):
        ex.main(tiny + ["--method", "lissa"])
