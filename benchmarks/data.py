"""Preparing corpora into token shards, and training on them: throughput and memory (issue 18).

    python benchmarks/data.py --sizes 40             # a 40 MB corpus (a few minutes on 2 cores)
    python benchmarks/data.py --sizes 40,400         # and a 400 MB one (~10x longer)

For each size, a ``.jsonl`` corpus is generated from the embedded text (Python's reference
topics, each copy's documents numbered so that no two are identical), then, each in a fresh
process measured by ``/usr/bin/time`` (peak RSS, user + system CPU seconds):

- ``aam-func prepare`` with each byte-level BPE of ``--vocab-sizes`` (4096: trained on the
  embedded corpus; 32768: on it and Python's own modules, the text it takes to fill 32768
  tokens): tokens/s (wall, and per CPU second of the process and its threads), peak RSS and the
  encoder it used (tiktoken when exact, else the tokenizer: ``aam_func.data.encoders``); the
  anchors are that tokenizer's ``encode_batch_fast`` and tiktoken with its ranks, alone on the
  same text in this process, per CPU second;
- a short training run on the prepared directory (``--steps 3``, the default model, the first
  vocabulary's shards): peak RSS and the time from process start to the end of the first step,
  with where it went (imports; opening and verifying the data; the tokenizer, loader and model;
  the first step); the same on the small embedded corpus gives the reference.
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
marks = {"import": time.perf_counter() - t0}
def log(line):
    for key in ("prepared", "corpus:", "model:", "step 1/"):
        if line.startswith(key) and key not in marks:
            marks[key] = time.perf_counter() - t0
cfg = run.RunConfig(data=sys.argv[1] or None, output_dir=sys.argv[2], steps=3, stop_after=1, eval_every=0, eval_batches=2,
                    sample_tokens=0, log_every=1)
run.loop(run.prepare(cfg, "cpu", log=log))
print("MARKS", " ".join(f"{k.rstrip(':/').replace(' ', '_')}={v:.3f}" for k, v in marks.items()))
print("FIRST_STEP", marks["step 1/"])
"""


def first_step_breakdown(out: str) -> str:
    """The phases of a ``_FIRST_STEP`` run from its MARKS line (seconds from process start)."""
    marks = dict(kv.split("=") for kv in next(l for l in out.splitlines() if l.startswith("MARKS")).split()[1:])
    m = {k: float(v) for k, v in marks.items()}
    opened = m.get("prepared", m["import"])
    parts = [("imports", m["import"]), ("data opened (and verified, or prepared)", opened - m["import"]),
             ("loader and model", m["model"] - opened),
             ("first step", m["step_1"] - m["model"])]
    return ", ".join(f"{name} {sec:.2f}s" for name, sec in parts)


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
STDERR: dict = {}  # cmd (joined) -> its stderr (the log lines of prepare)


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
    STDERR[" ".join(cmd)] = r.stderr
    return wall, int(fields[1]) * 1024, r.stdout


def anchor_rates(tok: Tokenizer, corpus: str, max_docs: int = 4000) -> dict:
    """Tokens per CPU second (all threads) of each encoder alone over the corpus's first
    documents (no reading, no writing): the tokenizer's ``encode_batch_fast`` (its own threads)
    and, when it can run this tokenizer exactly, tiktoken (``encoders.TiktokenEncoder``, one thread)."""
    from aam_func.data.encoders import HFEncoder, batch_encoder

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(max_docs)]
    rates = {}
    for enc in (HFEncoder(tok), batch_encoder(tok)):
        if enc.name in rates:
            continue
        c0 = time.process_time()
        n = sum(a.size for a in enc.encode(texts))
        rates[enc.name] = n / (time.process_time() - c0)
    return rates


def train_tokenizer(vocab_size: int, directory: str) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens: on the embedded corpus up to 8192, with Python's
    own modules beside it above (the embedded text alone fills ~6.7k tokens)."""
    import glob

    texts = default_corpus()
    if vocab_size > 8192:
        root = os.path.dirname(os.__file__)
        texts += [open(f, encoding="utf-8", errors="replace").read() for f in sorted(glob.glob(root + "/*.py"))]
    return Tokenizer.train_bpe(texts, vocab_size, min_frequency=1 if vocab_size > 8192 else 2, save_dir=directory)


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
    p.add_argument("--vocab-sizes", default="4096,32768", help="BPE sizes, comma-separated (training uses the first)")
    p.add_argument("--workdir", default=None, help="default: a temporary directory (removed)")
    p.add_argument("--replica", type=int, default=0,
                   help="also measure training on N copies of the last corpus's shards (replicate())")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        vocabs = [int(v) for v in args.vocab_sizes.split(",")]
        toks = {v: train_tokenizer(v, os.path.join(work, f"bpe{v}")) for v in vocabs}
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; BPEs: "
              + ", ".join(f"{v} ({t.vocab_size} tokens)" for v, t in toks.items()), flush=True)
        wall, rss, out = timed([sys.executable, "-c", _FIRST_STEP, "", os.path.join(work, "run-embedded")], env)
        ref_rss, ref_first = rss, float(out.split()[-1])
        print(f"reference: training on the embedded corpus: peak RSS {rss / 2**20:.0f} MB, first step after "
              f"{ref_first:.2f}s ({first_step_breakdown(out)})", flush=True)
        rows = []
        for mb in [int(s) for s in args.sizes.split(",")]:
            corpus = os.path.join(work, f"corpus-{mb}mb.jsonl")
            nbytes = make_corpus(corpus, mb)
            for v in vocabs:
                rows.append(_prepare_row(mb, nbytes, v, corpus, work, env))
            prepared = os.path.join(work, f"prepared-{mb}mb-bpe{vocabs[0]}")
            _, train_rss, out2 = timed([sys.executable, "-c", _FIRST_STEP, prepared, os.path.join(work, f"run-{mb}")],
                                       env)
            first = float(out2.split()[-1])
            for row in rows:
                if row["mb"] == mb and row["vocab"] == vocabs[0]:
                    row.update(train_rss=train_rss, first=first)
            print(f"{mb} MB, training on the BPE {vocabs[0]} shards: peak RSS {train_rss / 2**20:.0f} MB (reference + "
                  f"{(train_rss - ref_rss) / 2**20:.0f} MB); first step after {first:.2f}s "
                  f"({first_step_breakdown(out2)})", flush=True)
            os.remove(corpus)
        if args.replica:
            mb = rows[-1]["mb"]
            big = os.path.join(work, f"replica-{args.replica}x{mb}mb")
            replicate(os.path.join(work, f"prepared-{mb}mb-bpe{vocabs[0]}"), big, args.replica)
            _, rss, out = timed([sys.executable, "-c", _FIRST_STEP, big, os.path.join(work, "run-replica")], env)
            print(f"{args.replica} x {mb} MB replica (no preparation): training peak RSS {rss / 2**20:.0f} MB "
                  f"(reference + {(rss - ref_rss) / 2**20:.0f} MB); first step after {float(out.split()[-1]):.2f}s "
                  f"({first_step_breakdown(out)})", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print("\n| corpus | BPE | tokens | encoder | prepare tok/s (wall) | prepare tok per CPU s | tokenizer "
              "alone per CPU s | tiktoken alone per CPU s | prepare peak RSS | train peak RSS (reference + extra) "
              "| first step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            extra = (r.get("train_rss", 0) - ref_rss) / 2**20
            train = f"{r['train_rss'] / 2**20:.0f} MB ({ref_rss / 2**20:.0f} + {extra:.0f})" if "train_rss" in r \
                else "—"
            first = f"{r['first']:.2f}s" if "first" in r else "—"
            print(f"| {r['mb']} MB | {r['vocab']} | {r['tokens']:,} | {r['engine']} | {r['tokens'] / r['wall']:,.0f} | "
                  f"{r['tokens'] / r['cpu']:,.0f} | {r['anchors'].get('tokenizers', 0):,.0f} | "
                  f"{r['anchors'].get('tiktoken', 0):,.0f} | {r['rss'] / 2**20:.0f} MB | {train} | {first} |")
        print(f"| embedded (reference) | {vocabs[0]} (trained in the run) | | | | | | | | {ref_rss / 2**20:.0f} MB | "
              f"{ref_first:.2f}s |")


def _prepare_row(mb: int, nbytes: int, vocab: int, corpus: str, work: str, env) -> dict:
    """``aam-func prepare`` of ``corpus`` with the BPE of ``vocab`` in a fresh process, and the anchors."""
    prepared = os.path.join(work, f"prepared-{mb}mb-bpe{vocab}")
    tok_dir = os.path.join(work, f"bpe{vocab}")
    cmd = [sys.executable, "-m", "aam_func", "prepare", "--data", corpus, "--output", prepared, "--tokenizer", tok_dir]
    wall, rss, out = timed(cmd, env)
    cpu = CPU_SECONDS[" ".join(cmd)]
    index = json.load(open(os.path.join(prepared, "index.json")))
    tokens = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    line = next((l for l in (out + STDERR.get(" ".join(cmd), "")).splitlines() if "encoding with" in l), "")
    engine = line.split("encoding with", 1)[1].strip() if line else "?"
    anchors = anchor_rates(Tokenizer.load(tok_dir), corpus)
    print(f"{mb} MB ({nbytes / 1e6:.0f} MB of JSON lines), BPE {vocab}: {tokens:,} tokens, prepare {wall:.1f}s wall = "
          f"{tokens / wall:,.0f} tok/s; {tokens / cpu:,.0f} tokens per CPU second ({cpu:.1f} CPU s, the process "
          f"and its threads, imports included); encoder: {engine}; alone per CPU second: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in anchors.items()) + f"; peak RSS {rss / 2**20:.0f} MB", flush=True)
    return dict(mb=mb, vocab=vocab, tokens=tokens, wall=wall, cpu=cpu, rss=rss, engine=engine, anchors=anchors)


if __name__ == "__main__":
    main()
