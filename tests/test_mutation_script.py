"""The mutation script's plumbing (scripts/mutation.py, scripts/mutation_fast.py): the lines each
mutant has, which mutants run at import time, and which tests the fast route gives a mutant."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import mutation  # noqa: E402
import mutation_fast  # noqa: E402

SOURCE = """K = 2 + 3


def f(x, y=4 * 2):
    return (x +
            1)


class C:
    z = 5 - 1
"""


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(SOURCE)
    monkeypatch.setattr(mutation, "ROOT", str(tmp_path))
    return {m["id"]: m for m in mutation.mutants("m.py")}


def _one(ms, line, what):
    (m,) = [m for m in ms.values() if m["line"] == line and m["what"] == what]
    return m


def test_spots_lines_and_import_time(module):
    body = _one(module, 5, "Add->Sub")
    assert body["lines"] == [5, 6] and not body["import_time"]  # the expression's lines, its statement's first
    assert _one(module, 1, "Add->Sub")["import_time"]  # module level
    assert not [m for m in module.values() if m["line"] == 4]  # signatures are not mutated
    assert _one(module, 10, "Sub->Add")["import_time"]  # a class body
    for m in module.values():
        assert m["line"] in m["lines"]
        assert ast.dump(ast.parse(m["source"])) != ast.dump(ast.parse(SOURCE))


def test_real_module_mutants_are_distinct_and_in_bounds():
    ms = mutation.mutants("aam_func/ops/remat.py")
    n = len(open(os.path.join(ROOT, "aam_func/ops/remat.py")).read().splitlines())
    assert len({m["id"] for m in ms}) == len(ms) > 10
    assert all(1 <= min(m["lines"]) and max(m["lines"]) <= n for m in ms)


def test_fast_route_selection(module):
    cov_map = {"lines": {"m.py": {"5": ["t.py::slow", "t.py::quick"], "1": [""]}},
               "durations": {"t.py::slow": 5.0, "t.py::quick": 0.5}}
    assert mutation_fast.select(cov_map, _one(module, 5, "Add->Sub")) == (["t.py::quick", "t.py::slow"], "coverage")
    assert mutation_fast.select(cov_map, _one(module, 1, "Add->Sub")) == (None, "import-time")
    assert mutation_fast.select(cov_map, _one(module, 10, "Sub->Add")) == (None, "import-time")
    other = dict(_one(module, 5, "Add->Sub"), lines=[7])
    assert mutation_fast.select(cov_map, other) == (None, "not executed in-process")
    assert mutation_fast.limit_for(cov_map, ["t.py::quick", "t.py::slow"], None) == pytest.approx(30 + 4 * 5.5)
    assert mutation_fast.limit_for(cov_map, ["t.py::quick"], 99.0) == 99.0
