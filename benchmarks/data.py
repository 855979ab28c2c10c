"""Preparing corpora into token shards, and training on them: throughput and memory (issue 18).

    python benchmarks/data.py --sizes 40             # a 40 MB corpus (a few minutes on 2 cores)
    python benchmarks/data.py --sizes 40,400         # and a 400 MB one (~10x longer)

For each size, a ``.jsonl`` corpus is generated from the embedded text (Python's reference
topics, each copy's documents numbered so that no two are identical), then, each in a fresh
process measured by ``/usr/bin/time`` (peak RSS):

- ``aam-func prepare`` with a byte-level BPE of 8192 tokens trained once on the embedded
  corpus: tokens/s and peak RSS; the anchor is the same tokenizer's ``encode_batch`` alone on
  the same text in this process (the ratio is what the pipeline around it costs);
- a short training run on the prepared directory (``--steps 3``, the default model): peak RSS
  and the time from process start to the end of the first step; the same on the small embedded
  corpus gives the reference RSS (the model, its optimizer state and the runtime).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aam_func.data import default_corpus  # noqa: E402
from aam_func.tokenizer import Tokenizer  # noqa: E402

_FIRST_STEP = """
import sys, time
t0 = time.perf_counter()
from aam_func import run
times = []
def log(line):
    if line.startswith("step 1/") and not times:
        times.append(time.perf_counter() - t0)
cfg = run.RunConfig(data=sys.argv[1] or None, output_dir=sys.argv[2], steps=3, stop_after=1, eval_every=0, eval_batches=2,
                    sample_tokens=0, log_every=1)
run.loop(run.prepare(cfg, "cpu", log=log))
print("FIRST_STEP", times[0])
"""


def make_corpus(path: str, megabytes: int) -> int:
    """Copies of the embedded documents as JSON lines until ``megabytes`` MB; returns the byte size."""
    docs = default_corpus()
    size, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1_000_000:
            for i, d in enumerate(docs):
                line = json.dumps({"text": f"Copy {copy}, topic {i}.\n{d}"}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
            copy += 1
    return size


CPU_SECONDS: dict = {}  # cmd (joined) -> user + system CPU seconds of its last timed() run


def timed(cmd: list[str], env=None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of ``cmd`` in a fresh process; its CPU seconds
    (user + system, all threads) go to ``CPU_SECONDS``."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M CPU %U %S", *cmd], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    fields = next(line for line in r.stderr.splitlines() if line.startswith("MAXRSS")).split()
    CPU_SECONDS[" ".join(cmd)] = float(fields[3]) + float(fields[4])
    return wall, int(fields[1]) * 1024, r.stdout


def anchor_rate(tok: Tokenizer, corpus: str, max_docs: int = 4000) -> float:
    """tokens/s of ``encode_batch`` alone over the corpus's first documents (no reading, no writing)."""
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(max_docs)]
    backend = tok.hf.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # what prepare calls
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
    ANCHOR_CPU_RATE.append(n / (time.process_time() - c0))
    return n / (time.perf_counter() - t0)


ANCHOR_CPU_RATE: list = []  # tokens per CPU second (all threads) of each anchor_rate() call


def replicate(prepared: str, out: str, times: int) -> None:
    """A prepared directory holding ``times`` copies of ``prepared``'s training shards (hard links,
    same sha256s) and its held-out ones: the size of a ``times``-larger corpus for the training
    measurements, without preparing one (not a corpus anyone would train on)."""
    import numpy as np

    from aam_func.data.shards import index_checksum

    index = json.load(open(os.path.join(prepared, "index.json")))
    os.makedirs(out, exist_ok=True)
    shards = []
    for k in range(times):
        for s in index["splits"]["train"]["shards"]:
            name = f"copy{k}-{s['file']}"
            if not os.path.exists(os.path.join(out, name)):
                os.link(os.path.join(prepared, s["file"]), os.path.join(out, name))
            shards.append({**s, "file": name})
    for s in index["splits"]["val"]["shards"]:
        if not os.path.exists(os.path.join(out, s["file"])):
            os.link(os.path.join(prepared, s["file"]), os.path.join(out, s["file"]))
    counts = np.fromfile(os.path.join(prepared, "counts.bin"), dtype="<u8").reshape(2, -1)
    counts[0] *= times
    counts.tofile(os.path.join(out, "counts.bin"))
    if not os.path.exists(os.path.join(out, "tokenizer")):
        import shutil

        shutil.copytree(os.path.join(prepared, "tokenizer"), os.path.join(out, "tokenizer"))
    train = index["splits"]["train"]
    index["splits"]["train"] = {"documents": train["documents"] * times, "tokens": train["tokens"] * times,
                                "shards": shards}
    index["counts"]["sha256"] = hashlib.sha256(counts.tobytes()).hexdigest()
    index["checksum"] = index_checksum(index)
    json.dump(index, open(os.path.join(out, "index.json"), "w"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="40", help="corpus sizes in MB, comma-separated")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workdir", default=None, help="default: a temporary directory (removed)")
    p.add_argument("--replica", type=int, default=0,
                   help="also measure training on N copies of the last corpus's shards (replicate())")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        tok_dir = os.path.join(work, f"bpe{args.vocab_size}")
        tok = Tokenizer.train_bpe(default_corpus(), args.vocab_size, save_dir=tok_dir)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        wall, rss, out = timed([sys.executable, "-c", _FIRST_STEP, "", os.path.join(work, "run-embedded")], env)
        ref_rss = rss
        print(f"reference: training on the embedded corpus: peak RSS {rss / 2**20:.0f} MB, first step after "
              f"{float(out.split()[-1]):.1f}s")
        rows = []
        for mb in [int(s) for s in args.sizes.split(",")]:
            corpus = os.path.join(work, f"corpus-{mb}mb.jsonl")
            nbytes = make_corpus(corpus, mb)
            prepared = os.path.join(work, f"prepared-{mb}mb")
            cmd = [sys.executable, "-m", "aam_func", "prepare", "--data", corpus, "--output", prepared,
                   "--tokenizer", tok_dir]
            wall, prep_rss, out = timed(cmd, env)
            prep_cpu = CPU_SECONDS[" ".join(cmd)]
            index = json.load(open(os.path.join(prepared, "index.json")))
            tokens = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
            anchor = anchor_rate(tok, corpus)
            _, train_rss, out2 = timed([sys.executable, "-c", _FIRST_STEP, prepared, os.path.join(work, f"run-{mb}")],
                                       env)
            first = float(out2.split()[-1])
            rows.append((mb, nbytes, tokens, wall, tokens / wall, anchor, prep_rss, train_rss, first))
            print(f"{mb} MB: prepare {tokens / prep_cpu:,.0f} tokens per CPU second (process and its threads, "
                  f"{prep_cpu:.1f} CPU s); encode alone {ANCHOR_CPU_RATE[-1]:,.0f} per CPU second; ratio "
                  f"{tokens / prep_cpu / ANCHOR_CPU_RATE[-1]:.2f} (load-independent; a quiet 2-core machine gives at "
                  "most twice the per-CPU-second rate)", flush=True)
            print(f"{mb} MB ({nbytes / 1e6:.0f} MB of JSON lines, {tokens:,} tokens): prepare {wall:.0f}s, "
                  f"{tokens / wall:,.0f} tok/s end to end (encode_batch alone: {anchor:,.0f} tok/s, ratio "
                  f"{tokens / wall / anchor:.2f}); peak RSS prepare {prep_rss / 2**20:.0f} MB, training "
                  f"{train_rss / 2**20:.0f} MB (reference + {(train_rss - ref_rss) / 2**20:.0f} MB); "
                  f"first step after {first:.1f}s", flush=True)
            os.remove(corpus)
        if args.replica:
            mb = rows[-1][0]
            big = os.path.join(work, f"replica-{args.replica}x{mb}mb")
            replicate(os.path.join(work, f"prepared-{mb}mb"), big, args.replica)
            _, rss, out = timed([sys.executable, "-c", _FIRST_STEP, big, os.path.join(work, "run-replica")], env)
            print(f"{args.replica} x {mb} MB replica ({rows[-1][2] * args.replica:,} tokens, no preparation): training "
                  f"peak RSS {rss / 2**20:.0f} MB (reference + {(rss - ref_rss) / 2**20:.0f} MB); first step after "
                  f"{float(out.split()[-1]):.1f}s", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print("\n| corpus | tokens | prepare tok/s | encode_batch tok/s | ratio | prepare peak RSS | train peak RSS "
              "(reference + extra) | first step |")
        print("|---|---|---|---|---|---|---|---|")
        for mb, nbytes, tokens, wall, rate, anchor, prss, trss, first in rows:
            print(f"| {mb} MB | {tokens:,} | {rate:,.0f} | {anchor:,.0f} | {rate / anchor:.2f} | {prss / 2**20:.0f} MB "
                  f"| {trss / 2**20:.0f} MB ({ref_rss / 2**20:.0f} + {(trss - ref_rss) / 2**20:.0f}) | {first:.1f}s |")


if __name__ == "__main__":
    main()
