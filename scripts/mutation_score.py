"""The mutation score from the ``--json`` files of scripts/mutation.py runs.

    python scripts/mutation_score.py campaign.json                  # the suite as that run saw it
    python scripts/mutation_score.py campaign.json rerun.json       # later files override earlier ones

Mutants are counted once, by their last result; ids no longer in the population (the file
changed, or the spot is now excluded) and ids in ``EQUIVALENT`` are left out of the score. A
timeout counts as killed, as in the script, and is also shown on its own. With a sample (not every
mutant run), the one-sided 95% Clopper-Pearson lower bound says how low the score of the whole
population can be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mutation  # noqa: E402


def lower_bound(killed: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion."""
    from scipy.stats import beta

    return 0.0 if killed == 0 else float(beta.ppf(1 - confidence, killed, n - killed + 1))


def _key(file, line_text, mid, what):
    """A mutant by its content (file, the line's text, column, change, #n): stable when lines move."""
    _, _, col, rest = mid.rsplit(":", 3) if mid.count(":") >= 3 else ("", "", "", mid)
    return file, line_text, col, what, rest.partition("#")[2]


def score(paths):
    population, by_key = {}, {}
    for rel, _ in mutation._files(set()):
        for m in mutation.mutants(rel):
            population[m["id"]] = rel
            by_key.setdefault(_key(rel, m["original_line"], m["id"], m["what"]), []).append(m["id"])
    last = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)["results"]
        count = {}
        for r in results:  # runs made before ids were made unique: the n-th result of an id is its #n
            count[r["id"]] = count.get(r["id"], 0) + 1
            mid = r["id"] if count[r["id"]] == 1 or "#" in r["id"] else f"{r['id']}#{count[r['id']]}"
            same = by_key.get(_key(r["file"], r["original_line"], mid, r["what"]), [])
            if len(same) == 1:  # the same change of the same line text, wherever the line is now
                mid = same[0]
            last[mid] = r
    rows = {rel: dict(mutants=0, run=0, killed=0, timeout=0, survived=0, equivalent=0) for rel in
            dict.fromkeys(population.values())}
    for mid, rel in population.items():
        rows[rel]["mutants"] += 1
        if mid in mutation.EQUIVALENT:
            rows[rel]["equivalent"] += 1
            continue
        r = last.get(mid)
        if r is None or r["status"] == "equivalent":
            continue
        rows[rel]["run"] += 1
        rows[rel]["killed" if r["status"] == "killed" else "timeout" if r["status"] == "timeout" else "survived"] += 1
    survivors = sorted(mid for mid in population if mid not in mutation.EQUIVALENT
                       and last.get(mid, {}).get("status") == "survived")
    return rows, survivors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    a = ap.parse_args(argv)
    rows, survivors = score(a.json)
    print("| module | mutants | equivalent | run | killed | of them timeouts | survived | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    tot = dict.fromkeys(next(iter(rows.values())), 0)
    for rel, s in rows.items():
        for k in tot:
            tot[k] += s[k]
        dead = s["killed"] + s["timeout"]
        pct = f"{100 * dead / s['run']:.1f}%" if s["run"] else "-"
        print(f"| {rel} | {s['mutants']} | {s['equivalent']} | {s['run']} | {dead} | {s['timeout']} | "
              f"{s['survived']} | {pct} |")
    dead = tot["killed"] + tot["timeout"]
    if tot["run"]:
        print(f"| **all** | {tot['mutants']} | {tot['equivalent']} | {tot['run']} | {dead} | {tot['timeout']} | "
              f"{tot['survived']} | **{100 * dead / tot['run']:.1f}%** |")
        print(f"\nif the mutants run are a uniform random sample of the population: lower bound (one-sided 95%, "
              f"Clopper-Pearson) of its score "
              f"{100 * lower_bound(dead, tot['run']):.1f}%; without the timeouts: "
              f"{100 * tot['killed'] / max(1, tot['run'] - tot['timeout']):.1f}%")
    for mid in survivors:
        print("SURVIVED", mid)


if __name__ == "__main__":
    main()
