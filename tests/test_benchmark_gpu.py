"""benchmarks/gpu.py runs (on the CPU with --smoke): every case prints one JSON line with a
status, and no case errors. The GPU figures themselves come from a GPU run (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*groups):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke"] + (["--only", *groups] if groups else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert lines and lines[0]["case"] == "environment"
    errors = [x for x in lines if not (x["status"] == "ok" or x["status"].startswith("skipped"))]
    assert not errors, errors
    return lines


def test_smoke_cross_entropy_group():
    lines = _run("ce")
    cases = {x["case"]: x for x in lines if x["group"] == "ce"}
    assert cases["aam_func fused"]["fwd_bwd_ms"] > 0 and cases["F.linear+F.cross_entropy"]["fwd_bwd_ms"] > 0


@pytest.mark.slow
def test_smoke_whole_suite():
    lines = _run()
    groups = {x["group"] for x in lines if x["status"] == "ok" and x["case"] != "group total"}
    assert groups == {"meta", "train", "attention", "per_sample", "generate", "ce"}
    tri = [x for x in lines if x["group"] == "attention" and x.get("backend") == "triton"]
    assert {x["variant"] for x in tri} == {"causal", "window", "alibi", "gqa"} and all(x["status"] == "ok" for x in tri)
    assert all(x["jvp_ms"] > 0 for x in tri)
