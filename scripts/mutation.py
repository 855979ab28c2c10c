"""Mutation testing of aam_func's math: does the suite notice when the code is wrong?

    python scripts/mutation.py --list                        # the mutants, per module
    python scripts/mutation.py --sample 10 --seed 0          # 10 random mutants per module file
    python scripts/mutation.py --only aam_func/losses.py     # every mutant of one file
    python scripts/mutation.py --sample 3 --seed 3 --interleave --skip old.json --json new.json
                                                             # a new sample, round-robin over the files

Each mutant changes one operator or constant in a copy of the package (``+``<->``-``,
``*``<->``/``, ``**``->``*``, ``<``<->``<=``, ``>``<->``>=``, ``==``<->``!=``, ``and``<->``or``,
a dropped unary ``-`` or ``not``, an int ``n``->``n+1``, a float ``x``->``2x`` (0->1), ``True``
<->``False``), then runs only the test files relevant to that module (``TARGETS``), ``-x``, with
a timeout. Killed: a test failed or the run timed out; survived: every test passed.
Validation code is not mutated (``raise`` statements, ``check_*``/``_check*`` functions,
asserts, f-strings, keyword arguments such as ``stacklevel``), nor the registry's sample plumbing
(``_samples``, ``_sample*``, ``_SAMPLE*``, the ``_op``/``_ref`` wrappers it checks with): the point
is the math. Mutants judged equivalent (no test could tell them apart) are in ``EQUIVALENT`` with the
reason and are left out of the score. Results: a table on stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module file pattern -> pytest runs (each a list of args) that test it; run in order, -x
TARGETS = {
    "aam_func/ops/attention/*.py": [["tests/test_gaps2_attention.py", "tests/test_gaps_attention.py", "tests/test_gaps_attention_facts.py",
                                     "tests/test_gaps_attention_flex.py", "tests/test_gaps_attention_mods.py",
                                     "tests/test_attention.py", "tests/test_attention_backends.py",
                                     "tests/test_attention_mods.py", "tests/test_attention_mods_flex.py",
                                     "tests/test_document_mask.py"],
                                    ["tests/test_ops_registry.py", "-k", "attention"],
                                    ["tests/test_attention_triton.py", "-k", "routes_to_triton"]],
    "aam_func/ops/rope.py": [["tests/test_gaps2_ops.py", "tests/test_rope.py"], ["tests/test_ops_registry.py", "-k", "rope"]],
    "aam_func/ops/cross_entropy.py": [["tests/test_gaps2_ops.py", "tests/test_cross_entropy.py"], ["tests/test_ops_registry.py", "-k", "cross_entropy"]],
    "aam_func/ops/remat.py": [["tests/test_gaps2_ops.py", "tests/test_remat.py"], ["tests/test_gaps_misc.py", "-k", "remat"],
                              ["tests/test_ops_registry.py", "-k", "remat"]],
    "aam_func/losses.py": [["tests/test_gaps2_ops.py", "tests/test_gaps_misc.py", "tests/test_losses.py"]],
    "aam_func/privacy/*.py": [["tests/test_gaps2_privacy.py", "tests/test_gaps_privacy.py", "tests/test_gaps_misc.py", "tests/test_privacy.py",
                               "tests/test_privacy_accountants.py",
                               "tests/test_privacy_clipping.py"]],
    "aam_func/per_sample/*.py": [["tests/test_gaps2_per_sample.py", "tests/test_gaps_per_sample.py", "tests/test_gaps_misc.py", "tests/test_per_sample.py",
                                  "tests/test_per_sample_batched.py",
                                  "tests/test_ghost_modules.py", "tests/test_ghost_lookups.py", "tests/test_privacy_clipping.py"]],
    "aam_func/optim/transforms.py": [["tests/test_gaps2_optim.py", "tests/test_gaps_optim.py", "tests/test_optim.py"]],
}

from mutation_equivalent import EQUIVALENT  # noqa: E402  (mutant id -> why no test can tell it apart)

_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult, ast.FloorDiv: ast.Div}
_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_SKIP_KEYWORDS = {"stacklevel", "dim", "keepdim"}


def _skipped_function(name: str) -> bool:
    """Validation, and the registry's sample plumbing (its inputs, and the op and reference wrappers it
    checks with: test code that lives beside the op)."""
    return (name.startswith(("check_", "_check", "_sample"))
            or name in ("_op", "_ref", "__repr__", "__post_init__"))


class _Finder(ast.NodeVisitor):
    """Collects (node path, kind, description) for every mutable spot outside validation code."""

    def __init__(self):
        self.spots: list = []
        self.path: list = []

    def generic_visit(self, node):
        for field, value in ast.iter_fields(node):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, ast.AST):
                    self.path.append((field, i if isinstance(value, list) else None))
                    self.visit(item)
                    self.path.pop()

    def _add(self, node, kind, what):
        self.spots.append((list(self.path), kind, node.lineno, node.col_offset, what))

    def visit_FunctionDef(self, node):
        if not _skipped_function(node.name):
            for i, stmt in enumerate(node.body):
                self.path.append(("body", i))
                self.visit(stmt)
                self.path.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Raise(self, node):
        pass

    def visit_Assert(self, node):
        pass

    def visit_JoinedStr(self, node):
        pass

    def visit_Expr(self, node):
        if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            self.generic_visit(node)

    def visit_keyword(self, node):
        if node.arg not in _SKIP_KEYWORDS:
            self.generic_visit(node)

    def visit_Call(self, node):
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
        if name.startswith(("check_", "_check")) or name in ("register", "warn", "OpSpec"):
            return
        self.generic_visit(node)

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and (t.id == "__all__" or t.id.startswith("_SAMPLE")) for t in node.targets):
            return
        self.generic_visit(node)

    def visit_BinOp(self, node):
        if type(node.op) in _BIN:
            self._add(node, "binop", f"{type(node.op).__name__}->{_BIN[type(node.op)].__name__}")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if type(node.op) in _BIN:
            self._add(node, "augop", f"{type(node.op).__name__}=->{_BIN[type(node.op)].__name__}=")
        self.generic_visit(node)

    def visit_Compare(self, node):
        if len(node.ops) == 1 and type(node.ops[0]) in _CMP:
            self._add(node, "cmp", f"{type(node.ops[0]).__name__}->{_CMP[type(node.ops[0])].__name__}")
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        self._add(node, "boolop", "And->Or" if isinstance(node.op, ast.And) else "Or->And")
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.USub, ast.Not)):
            self._add(node, "unary", f"drop {type(node.op).__name__}")
        self.generic_visit(node)

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            self._add(node, "const", f"{v}->{not v}")
        elif isinstance(v, int):
            self._add(node, "const", f"{v}->{v + 1}")
        elif isinstance(v, float):
            self._add(node, "const", f"{v!r}->{(2 * v) if v else 1.0!r}")


def _node_at(tree, path):
    node = tree
    for field, i in path:
        node = getattr(node, field) if i is None else getattr(node, field)[i]
    return node


def _mutate(node, kind):
    if kind == "binop":
        node.op = _BIN[type(node.op)]()
    elif kind == "augop":
        node.op = _BIN[type(node.op)]()
    elif kind == "cmp":
        node.ops = [_CMP[type(node.ops[0])]()]
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "const":
        v = node.value
        node.value = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, int) else (2 * v if v else 1.0)


def mutants(relpath: str) -> list:
    """Every mutant of one file: dicts with id, file, line, what, and the mutated source."""
    src = open(os.path.join(ROOT, relpath), encoding="utf-8").read()
    tree = ast.parse(src)
    finder = _Finder()
    finder.visit(tree)
    out, seen = [], {}
    for path, kind, line, col, what in finder.spots:
        t = copy.deepcopy(tree)
        node = _node_at(t, path)
        if kind == "unary":
            parent = _node_at(t, path[:-1])
            field, i = path[-1]
            replacement = node.operand
            if i is None:
                setattr(parent, field, replacement)
            else:
                getattr(parent, field)[i] = replacement
        else:
            _mutate(node, kind)
        mid = f"{relpath}:{line}:{col}:{what}"
        seen[mid] = seen.get(mid, 0) + 1
        if seen[mid] > 1:  # nested spots that start at one column (a * b * c): #2, #3, ... outwards in
            mid = f"{mid}#{seen[mid]}"
        out.append({"id": mid, "file": relpath, "line": line, "what": what,
                    "source": ast.unparse(t), "original_line": src.splitlines()[line - 1].strip(),
                    "lines": _lines(tree, path), "import_time": not _in_function_body(tree, path)})
    return out


def _lines(tree, path):
    """The source lines whose execution runs the mutated spot: its own lines and the first line of
    the innermost statement holding it (a line event may fire only there)."""
    node, stmt = tree, None
    for step in path:
        node = _node_at(node, [step])
        if isinstance(node, ast.stmt):
            stmt = node
    lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    if stmt is not None:
        lines.add(stmt.lineno)
    return sorted(lines)


def _in_function_body(tree, path):
    """Whether the spot runs when a function is called (not when the module or a class body runs,
    nor a default argument)."""
    node = tree
    for field, i in path:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and field == "body":
            return True
        node = getattr(node, field) if i is None else getattr(node, field)[i]
    return False


def _files(only):
    for pattern, runs in TARGETS.items():
        for f in sorted(glob.glob(os.path.join(ROOT, pattern))):
            rel = os.path.relpath(f, ROOT)
            if os.path.basename(rel) in ("registry.py",) or (only and rel not in only):
                continue
            yield rel, runs


def _run_tests(workdir, runs, timeout):
    env = dict(os.environ, PYTHONPATH=workdir, HYPOTHESIS_PROFILE="ci")
    start = time.time()
    for args in runs:
        left = timeout - (time.time() - start)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not cuda", *args]
        try:
            r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - start
        if r.returncode == 5:  # no tests collected: a TARGETS entry is wrong
            raise RuntimeError(f"no tests collected by {args}")
        if r.returncode != 0:
            return "killed", time.time() - start
    return "survived", time.time() - start


def _plan(a, rng):
    """(file, runs, its mutants, the chosen ones) per module file, in TARGETS order."""
    skip = set()
    for path in a.skip or ():
        with open(path, encoding="utf-8") as f:
            skip |= {r["id"] for r in json.load(f)["results"]}
    plan = []
    for rel, runs in _files(set(a.only or ())):
        ms = mutants(rel)
        pool = [m for m in ms if m["id"] not in skip]
        chosen = rng.sample(pool, min(a.sample, len(pool))) if a.sample else pool
        if a.ids:
            chosen = [m for m in ms if m["id"] in set(a.ids)]
            if not chosen:
                continue
        plan.append((rel, runs, ms, chosen))
    return plan


def _order(plan, interleave):
    """The (file, runs, mutant) runs: file by file, or round-robin over the files."""
    if not interleave:
        return [(rel, runs, m) for rel, runs, _, chosen in plan for m in chosen]
    rounds = max((len(chosen) for *_, chosen in plan), default=0)
    return [(rel, runs, chosen[i]) for i in range(rounds) for rel, runs, _, chosen in plan if i < len(chosen)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="module files (relative paths) to mutate")
    ap.add_argument("--ids", nargs="*", help="run only these mutant ids (as printed)")
    ap.add_argument("--sample", type=int, default=0, help="random mutants per file (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", help="--json files of earlier runs: their mutants are not sampled again")
    ap.add_argument("--interleave", action="store_true",
                    help="run the sample round-robin over the files (one mutant of each file, then the next), so "
                         "a run stopped early is still spread over every file")
    ap.add_argument("--timeout-factor", type=float, default=3.0,
                    help="a mutant's time limit: this times the unmutated run's time, plus 30 s (a timeout counts as killed)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="a fixed time limit per mutant in seconds, instead of timing an unmutated run first")
    ap.add_argument("--fast", action="store_true",
                    help="run each mutant against only the tests that execute its lines, in forked workers "
                         "(scripts/mutation_fast.py)")
    ap.add_argument("--workers", type=int, default=2, help="--fast: mutants run at once")
    ap.add_argument("--shuffle", action="store_true",
                    help="run the chosen mutants in a random order (--seed), so that a run stopped early is a "
                         "uniform random sample of them")
    ap.add_argument("--coverage-map", default=None,
                    help="--fast: where the per-line test map is kept (reused while sources are unchanged)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", default=None, help="write every result here")
    a = ap.parse_args(argv)
    plan = _plan(a, random.Random(a.seed))
    if a.list:
        for rel, _, ms, _ in plan:
            for m in ms:
                print(m["id"], "|", m["original_line"][:90])
        return _report({rel: {"mutants": len(ms)} for rel, _, ms, _ in plan}, [], a)
    if a.fast:
        return _main_fast(a, plan)
    work = tempfile.mkdtemp(prefix="aam_mutation_")
    for d in ("aam_func", "tests", "proofs", "examples"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(work, d), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), work)
    summary = {rel: {"mutants": len(ms), "run": 0, "killed": 0, "survived": 0, "equivalent": 0}
               for rel, _, ms, _ in plan}
    results, baselines = [], {}
    try:
        for rel, runs, m in _order(plan, a.interleave):
            s = summary[rel]
            if m["id"] in EQUIVALENT:
                s["equivalent"] += 1
                results.append(dict(m, status="equivalent", reason=EQUIVALENT[m["id"]], seconds=0.0))
                continue
            status, secs = _run_mutant(work, rel, runs, m, _limit(a, work, runs, rel, baselines))
            s["run"] += 1
            s["killed" if status != "survived" else "survived"] += 1
            results.append(dict(m, status=status, seconds=round(secs, 1)))
            print(f"{status:9s} {secs:6.1f}s {m['id']}  | {m['original_line'][:80]}", flush=True)
            if a.json:
                _write_json(a.json, summary, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(summary, results, a)


def _main_fast(a, plan):
    import mutation_fast

    summary = {rel: {"mutants": len(ms), "run": 0, "killed": 0, "survived": 0, "equivalent": 0}
               for rel, _, ms, _ in plan}
    results, order = [], []
    ordered = _order(plan, a.interleave)
    if a.shuffle:
        random.Random(a.seed).shuffle(ordered)
    for rel, runs, m in ordered:
        if m["id"] in EQUIVALENT:
            summary[rel]["equivalent"] += 1
            results.append(dict(m, status="equivalent", reason=EQUIVALENT[m["id"]], seconds=0.0))
        else:
            order.append((rel, runs, m))

    def record(m, status, secs, route):
        s = summary[m["file"]]
        s["run"] += 1
        s["killed" if status != "survived" else "survived"] += 1
        results.append(dict(m, status=status, seconds=round(secs, 1), route=route))
        print(f"{status:9s} {secs:6.1f}s {m['id']}  [{route}] | {m['original_line'][:70]}", flush=True)
        if a.json and len(results) % 10 == 0:
            _write_json(a.json, summary, results)

    cov_map = mutation_fast.load_map(TARGETS, a.coverage_map)
    mutation_fast.run(order, TARGETS, cov_map, a.workers, a.timeout, a.timeout_factor, record)
    _report(summary, results, a)


def _limit(a, work, runs, rel, baselines):
    """A mutant's time limit: --timeout, or --timeout-factor times the unmutated tests' time + 30 s."""
    if a.timeout:
        return a.timeout
    key = tuple(map(tuple, runs))
    if key not in baselines:  # the unmutated tests must pass; their time sets the limit
        status, secs = _run_tests(work, runs, 3600)
        if status != "survived":
            raise RuntimeError(f"the unmutated tests for {rel} do not pass ({status}): {runs}")
        baselines[key] = secs
        print(f"baseline  {secs:6.1f}s {runs}", flush=True)
    return a.timeout_factor * baselines[key] + 30


def _run_mutant(work, rel, runs, m, limit):
    """Writes the mutant into the copy, runs its tests, and puts the original back."""
    target = os.path.join(work, rel)
    original = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    with open(target, "w", encoding="utf-8") as f:
        f.write(m["source"])
    try:
        return _run_tests(work, runs, limit)
    finally:
        with open(target, "w", encoding="utf-8") as f:
            f.write(original)


def _report(summary, results, a):
    if a.list:
        print(json.dumps(summary, indent=1))
        return
    print("\n| module | mutants | run | killed | survived | equivalent | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tot = {"mutants": 0, "run": 0, "killed": 0, "survived": 0, "equivalent": 0}
    for rel, s in summary.items():
        for k in tot:
            tot[k] += s[k]
        score = f"{100 * s['killed'] / s['run']:.0f}%" if s["run"] else "-"
        print(f"| {rel} | {s['mutants']} | {s['run']} | {s['killed']} | {s['survived']} | {s['equivalent']} | {score} |")
    score = f"{100 * tot['killed'] / tot['run']:.1f}%" if tot["run"] else "-"
    print(f"| **all** | {tot['mutants']} | {tot['run']} | {tot['killed']} | {tot['survived']} | {tot['equivalent']} | {score} |")
    for r in results:
        if r["status"] == "survived":
            print(f"SURVIVED {r['id']}  | {r['original_line'][:100]}")
    if a.json:
        _write_json(a.json, summary, results)


def _write_json(path, summary, results):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "results": [{k: v for k, v in r.items() if k != "source"} for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
