"""The fast route of scripts/mutation.py: run each mutant against only the tests that execute it.

    python scripts/mutation.py --fast --workers 2 --json all.json      # every mutant, two at a time

Two things make a mutant cost about a second instead of half a minute:

1. **Coverage-selected tests.** One coverage run of the ``TARGETS`` tests records, per line of each
   mutated module, which test cases execute it (a coverage context per test node id, switched by
   a pytest hook). A mutant then runs only the test cases that execute one of its lines
   (``mutation.py`` gives each mutant its lines: the mutated expression and its statement's first
   line). A test that never runs a line cannot see it changed, so this selection loses no kill that
   happens in this process. Lines run only at import time, and lines no test executes in-process
   (a test may still reach them in a subprocess, or only under ``torch.compile``, which coverage
   does not see), fall back to the full ``TARGETS`` runs: the selection never makes a verdict that
   the slow route would not.
2. **A fork server.** The parent imports torch, numpy, hypothesis and pytest once and forks one
   child per mutant (``--workers`` at a time, one torch thread each). The child imports the
   mutated copy of ``aam_func`` fresh from its own work directory and calls ``pytest.main``.

A child's verdict: exit 0, survived; tests failed, collection broke or its time limit passed,
killed; a usage error or no tests collected, an error in this script (raised, never counted).
The limit is 30 s plus 4x the selected tests' time in the coverage run (itself slower than a
plain run), or ``--timeout``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PYTEST = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow and not cuda"]


class _ContextPlugin:
    """Switches the coverage context to the running test (its node id, parameters included: the
    registry's certification of one op is one test case, not the certification of all) and sums
    each test's time."""

    def __init__(self, cov):
        self.cov, self.durations = cov, {}

    def pytest_runtest_setup(self, item):
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration


def _measure(args, data_file, durations_file):
    """In a fresh process: one TARGETS run under coverage with per-test contexts."""
    import coverage
    import pytest

    cov = coverage.Coverage(data_file=data_file, source=[os.path.join(ROOT, "aam_func")])
    cov.start()
    _import_everything()  # every module's import-time lines land in the "" context, not a test's
    plugin = _ContextPlugin(cov)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow and not cuda", *args], plugins=[plugin])
    cov.stop()
    cov.save()
    with open(durations_file, "w", encoding="utf-8") as f:
        json.dump(plugin.durations, f)
    sys.exit(0 if code == 0 else 1)


def _import_everything():
    import importlib
    import pkgutil

    import aam_func

    for info in pkgutil.walk_packages(aam_func.__path__, "aam_func."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency (triton, ...) that is not installed
            pass


def build_map(targets, path):
    """Runs every distinct TARGETS run under coverage; writes {file: {line: [tests]}, durations}."""
    import coverage

    runs = []
    for entries in targets.values():
        for args in entries:
            if args not in runs:
                runs.append(args)
    tmp = tempfile.mkdtemp(prefix="aam_mutation_cov_")
    merged = coverage.CoverageData(os.path.join(tmp, "merged"))
    durations = {}
    try:
        for i, args in enumerate(runs):
            data, dur = os.path.join(tmp, f"cov{i}"), os.path.join(tmp, f"dur{i}.json")
            start = time.time()
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", data, dur, *args],
                               cwd=ROOT, env=dict(os.environ, HYPOTHESIS_PROFILE="ci", PYTHONPATH=ROOT))
            if r.returncode != 0:
                raise RuntimeError(f"the unmutated tests fail under coverage: {args}")
            print(f"coverage  {time.time() - start:6.1f}s {args}", flush=True)
            part = coverage.CoverageData(data)
            part.read()
            merged.update(part)
            with open(dur, encoding="utf-8") as f:
                for k, v in json.load(f).items():
                    durations[k] = max(durations.get(k, 0.0), v)
        lines = {}
        for measured in merged.measured_files():
            rel = os.path.relpath(measured, ROOT)
            by_line = merged.contexts_by_lineno(measured)
            lines[rel] = {str(n): sorted(c for c in ctx) for n, ctx in by_line.items()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"lines": lines, "durations": durations}, f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def select(cov_map, mutant):
    """(test function ids, "coverage") for a mutant, or (None, why) when it needs the full runs."""
    by_line = cov_map["lines"].get(mutant["file"], {})
    contexts = set()
    for n in mutant["lines"]:
        contexts.update(by_line.get(str(n), ()))
    if "" in contexts or mutant.get("import_time"):
        return None, "import-time"  # the value it computes is used by tests that never run the line
    if not contexts:
        return None, "not executed in-process"
    durations = cov_map["durations"]
    return sorted(contexts, key=lambda t: (durations.get(t, 1.0), t)), "coverage"  # quick kills first


def limit_for(cov_map, tests, timeout):
    if timeout:
        return timeout
    return 30.0 + 4.0 * sum(cov_map["durations"].get(t, 1.0) for t in tests)


class _ChildPlugin:
    """One torch thread; and the verdict is final when the session ends, so a failing or last run
    exits there, skipping pytest's unconfigure (its garbage collection alone takes over a second)."""

    def __init__(self, last):
        self.last = last

    def pytest_collection_finish(self, session):
        import torch

        torch.set_num_threads(1)

    def pytest_sessionfinish(self, session, exitstatus):
        if int(exitstatus) != 0 or self.last:
            os._exit(int(exitstatus))


def _child(workdir, runs):
    """In the forked child: this work copy's aam_func, the pytest runs in order; exits."""
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.chdir(workdir)
        sys.path.insert(0, workdir)
        os.environ["PYTHONPATH"] = workdir
        os.environ["HYPOTHESIS_PROFILE"] = "ci"
        import pytest

        for i, args in enumerate(runs):
            code = int(pytest.main([*_PYTEST, *args], plugins=[_ChildPlugin(last=i == len(runs) - 1)]))
            if code != 0:
                os._exit(code)
        os._exit(0)
    except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
        os._exit(3)


def _pyc(workdir, rel):
    folder = os.path.join(workdir, os.path.dirname(rel), "__pycache__")
    stem = os.path.splitext(os.path.basename(rel))[0] + "."
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(stem):
                os.remove(os.path.join(folder, name))


def make_workdirs(n):
    dirs = []
    for _ in range(n):
        work = tempfile.mkdtemp(prefix="aam_mutation_")
        for d in ("aam_func", "tests", "proofs", "examples"):
            shutil.copytree(os.path.join(ROOT, d), os.path.join(work, d),
                            ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), work)
        dirs.append(work)
    return dirs


def serve(jobs, workdirs, on_result):
    """Runs jobs [(mutant or None, runs, limit)] in forked children, one per work directory at a
    time; calls on_result(job, status, seconds, exit code). A job with mutant None runs the
    unmutated copy (a baseline)."""
    _preload()

    free, running, queue = list(workdirs), {}, list(jobs)
    while queue or running:
        while free and queue:
            work, job = free.pop(), queue.pop(0)
            mutant = job[0]
            if mutant is not None:
                _pyc(work, mutant["file"])
                with open(os.path.join(work, mutant["file"]), "w", encoding="utf-8") as f:
                    f.write(mutant["source"])
            pid = os.fork()
            if pid == 0:
                _child(work, job[1])
            running[pid] = (work, job, time.time())
        _reap(running, free, on_result)


# imported once in the server and inherited by every child: what the tests and aam_func's lazy
# imports load (torch's compiler stack alone is over a second per child)
_PRELOAD = ("torch", "torch.func", "torch._dynamo", "torch._inductor", "torch.export", "numpy", "hypothesis",
            "pytest", "scipy", "scipy.special", "scipy.optimize", "scipy.stats", "scipy.integrate", "sympy",
            "einops", "safetensors", "transformers", "transformers.models.gpt2.modeling_gpt2",
            "transformers.models.llama.modeling_llama", "peft", "opacus", "triton", "torch.distributed")


def _preload():
    import gc
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.freeze()  # the preloaded objects: never scanned by a child's collections, nor copied by them


def _reap(running, free, on_result):
    time.sleep(0.02)
    for pid, (work, job, start) in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.time() - start
        if done == 0 and elapsed <= job[2]:
            continue
        if done == 0:  # over its limit: the child and anything it started
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            verdict, code = "timeout", None
        else:
            code = os.waitstatus_to_exitcode(status)
            if code in (4, 5):
                raise RuntimeError(f"pytest usage error or no tests (exit {code}) for {job[0] and job[0]['id']}: "
                                   f"{job[1]}")
            verdict = "survived" if code == 0 else "killed"
        del running[pid]
        mutant = job[0]
        if mutant is not None:
            _pyc(work, mutant["file"])
            shutil.copy(os.path.join(ROOT, mutant["file"]), os.path.join(work, mutant["file"]))
        free.append(work)
        on_result(job, verdict, elapsed, code)


def _fingerprint(targets):
    """A hash of the package and the targeted tests: a map is reused only while they are unchanged."""
    import hashlib

    files = {os.path.join("tests", "conftest.py")}
    for entries in targets.values():
        files.update(arg for args in entries for arg in args if arg.endswith(".py"))
    for folder, _, names in os.walk(os.path.join(ROOT, "aam_func")):
        files.update(os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".py"))
    h = hashlib.sha256()
    for rel in sorted(files):
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(rel.encode() + f.read())
    return h.hexdigest()


def load_map(targets, path):
    """The coverage map at path, rebuilt when missing or made from other sources."""
    fp = _fingerprint(targets)
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cov_map = json.load(f)
        if cov_map.get("fingerprint") == fp:
            return cov_map
        print(f"coverage map {path} is stale (sources changed): rebuilding", flush=True)
    path = path or os.path.join(tempfile.mkdtemp(prefix="aam_mutation_map_"), "map.json")
    build_map(targets, path)
    with open(path, encoding="utf-8") as f:
        cov_map = json.load(f)
    cov_map["fingerprint"] = fp
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cov_map, f)
    return cov_map


def run(order, targets_of, cov_map, workers, timeout, timeout_factor, record):
    """Runs [(file, runs, mutant)] in parallel; record(mutant, status, seconds, route) per result."""
    planned, full = [], {}
    for rel, runs, m in order:
        tests, route = select(cov_map, m)
        if tests is None:
            full[tuple(map(tuple, runs))] = runs
            planned.append((m, runs, None, route))
        else:
            planned.append((m, [tests], limit_for(cov_map, tests, timeout), route))
    # mutants that no test runs in-process go last: each needs the full runs, and few are killed
    planned.sort(key=lambda job: job[3] == "not executed in-process")
    workdirs = make_workdirs(workers)
    try:
        baselines = {}
        if full and not timeout:  # the unmutated full runs must pass; their time sets those limits
            def on_base(job, status, secs, code):
                if status != "survived":
                    raise RuntimeError(f"the unmutated tests do not pass ({status}, exit {code}): {job[1]}")
                baselines[tuple(map(tuple, job[1]))] = secs
                print(f"baseline  {secs:6.1f}s {job[1]}", flush=True)

            serve([(None, runs, 3600.0) for runs in full.values()], workdirs, on_base)
        jobs = []
        for m, runs, limit, route in planned:
            if limit is None:
                limit = timeout or timeout_factor * baselines[tuple(map(tuple, runs))] + 30
            jobs.append((m, runs, limit, route))
        serve(jobs, workdirs, lambda job, status, secs, code: record(job[0], status, secs, job[3]))
    finally:
        for work in workdirs:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--measure":
        _measure(sys.argv[4:], sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
