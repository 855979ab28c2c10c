"""The GPU benchmark suite: aam_func against its anchors, one JSON line per case.

    python benchmarks/gpu.py                    # on a GPU: the whole suite (aimed at <= 5 min on an H100)
    python benchmarks/gpu.py --only attention   # one group: train, attention, per_sample, generate, ce
    python benchmarks/gpu.py --smoke            # tiny shapes on the CPU in seconds (CI runs this)

Groups (issue 21): (a) ``train``: a GPT-2-small train step (12 x 768, vocab 50257, T 1024,
batch 8, bf16 autocast, fp32 masters) against transformers ``GPT2LMHeadModel`` (sdpa) with
``torch.optim.AdamW(fused=True)``, eager and compiled: tokens/s and MFU; (b) ``attention``:
fwd+bwd, causal, B 4, H 16, d 64/128, bf16, T 1k/4k/16k, every backend against SDPA and
FlexAttention, window/ALiBi/GQA variants, jvp time; (c) ``per_sample``: per-sample gradients
and a DP step against Opacus (hooks and ghost) at batch 32/128; (d) ``generate``: greedy, 128
tokens, batch 1/8/32, fp32/bf16, against transformers ``generate``; (e) ``ce``: the fused
LM-head cross-entropy against ``F.linear`` + ``F.cross_entropy`` (and Liger's, if installed).

Every case prints one line: ``{"group", "case", ...figures..., "status"}`` with status "ok",
"skipped: why" or "error: what". Each case times at most ``--budget`` seconds after its
warmup (the median of the repetitions it got); compile time is reported apart. Anchor and
aam_func run in the same process. Results and the command go to docs/benchmarks.md ("GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aam_func as af  # noqa: E402
from aam_func import optim, tree  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense, no sparsity


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP = [1]  # warmup calls per timing; 0 with --smoke (the figures mean nothing there)


def timed(fn, device, budget: float, warmup: int = 1, max_reps: int = 20) -> dict:
    """Median seconds of ``fn()`` over the repetitions that fit in ``budget`` (at least one)."""
    for _ in range(min(warmup, WARMUP[0])):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "reps": len(times)}


def emit(group: str, case: str, **fields):
    print(json.dumps({"group": group, "case": case, **fields}), flush=True)


@contextlib.contextmanager
def case(group: str, name: str, **meta):
    """Run one case; its figures go in the yielded dict; any failure is reported, not raised."""
    out: dict = {}
    try:
        yield out
        status = out.pop("status", "ok")
    except Exception as e:  # noqa: BLE001 - one failing case must not stop the suite
        status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    emit(group, name, **meta, **out, status=status)


# ---------------------------------------------------------------------------------------------
# (a) train step
# ---------------------------------------------------------------------------------------------


def gpt2(s, device):
    import transformers

    hc = transformers.GPT2Config(vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["d"], n_layer=s["layers"],
                                 n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                 eos_token_id=0)
    hc._attn_implementation = "sdpa"
    hf = transformers.GPT2LMHeadModel(hc).to(device)
    from aam_func.interop.hf import from_transformers

    cfg, params = from_transformers(hf)
    return hf, cfg.replace(dropout=0.0, attention_dropout=0.0), tree.to(params, device)


def train_flops(cfg, tokens: int, seq: int) -> float:
    """6 · tokens · matmul params (with the LM head) + attention (PaLM appendix count)."""
    d, L, V, ff = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff
    return 6 * tokens * (L * (4 * d * d + 2 * d * ff) + V * d) + 12 * L * seq * d * tokens


def bench_train(args, device):
    from aam_func.train import make_lm_loss, make_train_step

    s = args.sizes["train"]
    hf, cfg, params = gpt2(s, device)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    batch = {"input_ids": ids, "labels": ids}
    tokens, peak = ids.numel(), peak_flops(device)
    flops = train_flops(cfg, tokens, s["seq"])
    prec = "bf16" if device.type == "cuda" else "fp32"
    for compiled in (False, True) if (device.type == "cuda" or args.compile) else (False,):
        tag = "compiled" if compiled else "eager"
        with case("train", f"aam_func {tag}", precision=prec, **s) as out:
            step = make_train_step(make_lm_loss(af.Transformer(cfg)), optim.adamw(1e-4, weight_decay=0.1),
                                   precision=prec, compile=compiled)
            st = {"p": params, "s": step.init(params)}

            def ours():
                st["p"], st["s"], _ = step(st["p"], st["s"], batch)

            t0 = time.perf_counter()
            ours()
            sync(device)
            out["first_step_s"] = round(time.perf_counter() - t0, 2)
            r = timed(ours, device, args.budget)
            out.update(step_ms=r["s"] * 1e3, reps=r["reps"], tokens_per_s=tokens / r["s"],
                       mfu=None if peak is None else flops / r["s"] / peak)
        with case("train", f"transformers {tag}", precision=prec, **s) as out:
            model = torch.compile(hf) if compiled else hf
            opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")

            def theirs():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            r = timed(theirs, device, args.budget)
            out.update(step_ms=r["s"] * 1e3, reps=r["reps"], tokens_per_s=tokens / r["s"],
                       mfu=None if peak is None else flops / r["s"] / peak)


# ---------------------------------------------------------------------------------------------
# (b) attention
# ---------------------------------------------------------------------------------------------


def flex_call(q, k, v, variant: str, window: int):
    """FlexAttention (compiled) with the variant's mask_mod / score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, H = q.shape[2], q.shape[1]

    def causal(b, h, qi, kj):
        return (kj <= qi) & ((qi - kj < window) if variant == "window" else (qi >= 0))

    score_mod = None
    if variant == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=q.device) / H)

        def score_mod(score, b, h, qi, kj):
            return score - slopes[h] * (qi - kj)

    mask = create_block_mask(causal, None, None, T, T, device=q.device)
    fn = torch.compile(flex_attention)
    return lambda: fn(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=k.shape[1] != H)


def attention_inputs(s, T, d, variant, device, dtype):
    B, H = s["batch"], s["heads"]
    Hkv = max(1, H // 4) if variant == "gqa" else H
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda h: torch.randn(B, h, T, d, device=device, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


def ours_call(backend, q, k, v, variant, window, block):
    from aam_func.ops.attention import RelativeBias, attention

    H = q.shape[1]
    rel = None
    if variant == "alibi":
        rel = RelativeBias("alibi", torch.exp2(-8.0 * torch.arange(1, H + 1, device=q.device) / H))
    kw = dict(causal=True, window=window if variant == "window" else None, relative_bias=rel, backend=backend)
    if backend == "blockwise":
        kw.update(block_q=block, block_k=block)
    return lambda: attention(q, k, v, **kw)


def bench_attention(args, device):
    s = args.sizes["attention"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for d in s["dims"]:
        for T in s["lens"]:
            variants = ["causal"] + (["window", "alibi", "gqa"] if T in s["variant_lens"] else [])
            for variant in variants:
                for backend in s["backends"]:
                    _attention_case(args, device, dtype, s, d, T, variant, backend)


def _attention_case(args, device, dtype, s, d, T, variant, backend):
    meta = dict(backend=backend, variant=variant, T=T, d=d, B=s["batch"], H=s["heads"], dtype=str(dtype)[6:])
    with case("attention", f"{backend} {variant} T{T} d{d}", **meta) as out:
        if backend == "sdpa" and variant in ("window", "alibi"):
            out["status"] = "skipped: SDPA's fused kernels take no window or bias"
            return
        if backend == "flex" and device.type != "cuda":
            out["status"] = "skipped: FlexAttention is timed on CUDA only"
            return
        if backend == "math" and T > s["math_max"]:
            out["status"] = f"skipped: the dense math path holds (B, H, T, T) scores; T > {s['math_max']}"
            return
        q, k, v = attention_inputs(s, T, d, variant, device, dtype)
        if backend == "flex":
            fwd = flex_call(q, k, v, variant, s["window"])
        else:
            fwd = ours_call("sdpa" if backend == "sdpa" else backend, q, k, v, variant, s["window"], s["block"])
        dout = torch.randn(q.shape[:3] + (v.shape[-1],), device=device, dtype=dtype)

        def step():
            torch.autograd.grad(fwd(), (q, k, v), dout)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        r = timed(step, device, args.budget)
        f = timed(lambda: fwd().detach(), device, args.budget / 2)
        out.update(fwd_bwd_ms=r["s"] * 1e3, fwd_ms=f["s"] * 1e3, reps=r["reps"])
        if device.type == "cuda":
            out["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out.update(_jvp_times(args, device, backend, q, k, v, variant, s))


def _jvp_times(args, device, backend, q, k, v, variant, s) -> dict:
    """Forward-mode: jvp (primal + tangent) time; SDPA and FlexAttention have none."""
    if backend in ("sdpa", "flex"):
        return {"jvp_ms": None, "jvp_note": "no forward-mode AD"}
    ts = tuple(torch.randn_like(x) for x in (q, k, v))
    prims = tuple(x.detach() for x in (q, k, v))

    def f(a, b, c):
        return ours_call(backend, a, b, c, variant, s["window"], s["block"])()

    out = {"jvp_ms": timed(lambda: torch.func.jvp(f, prims, ts), device, args.budget / 2)["s"] * 1e3}
    if backend == "triton" and variant != "alibi":
        from aam_func.ops.attention.triton import attention_jvp

        kw = dict(causal=True, window=s["window"] if variant == "window" else None)
        out["fused_jvp_ms"] = timed(lambda: attention_jvp(*prims, *ts, **kw), device, args.budget / 2)["s"] * 1e3
    return out


# ---------------------------------------------------------------------------------------------
# (c) per-sample gradients and DP
# ---------------------------------------------------------------------------------------------


def bench_per_sample(args, device):
    from aam_func import per_sample as ps

    s = args.sizes["per_sample"]
    hf, cfg, params = gpt2(s, device)
    model = af.Transformer(cfg)
    loss = lambda p, b: model.apply(p, **b)["loss"]  # noqa: E731
    for B in s["batches"]:
        ids = torch.randint(0, s["vocab"], (B, s["seq"]), device=device)
        batch = {"input_ids": ids, "labels": ids}
        with case("per_sample", f"aam_func grads B{B}", B=B, **s) as out:
            out["ms"] = timed(lambda: ps.grads(loss, params, batch), device, args.budget)["s"] * 1e3
        with case("per_sample", f"aam_func nonprivate step B{B}", B=B, **s) as out:
            opt = optim.sgd(0.1)
            state = opt.init(params)
            g = torch.func.grad(loss)
            out["ms"] = timed(lambda: opt.update(g(params, batch), state, params), device, args.budget)["s"] * 1e3
        with case("per_sample", f"aam_func dp_sgd step B{B}", B=B, **s) as out:
            opt = optim.sgd(0.1)
            state = opt.init(params)
            step = ps.dp_sgd(loss, opt, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=B)
            gen = torch.Generator(device=device).manual_seed(0)
            out["ms"] = timed(lambda: step(params, state, batch, gen), device, args.budget)["s"] * 1e3
        for mode in ("hooks", "ghost"):
            with case("per_sample", f"opacus {mode} B{B}", B=B, **s) as out:
                out["ms"] = timed(_opacus_run(mode, s, ids, device), device, args.budget)["s"] * 1e3


def _opacus_run(mode, s, ids, device):
    import transformers
    from opacus import GradSampleModule, PrivacyEngine

    B, T = ids.shape
    pos = torch.arange(T, device=device).expand(B, T).contiguous()
    hc = transformers.GPT2Config(vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["d"], n_layer=s["layers"],
                                 n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 tie_word_embeddings=mode == "hooks", bos_token_id=0, eos_token_id=0)
    hc._attn_implementation = "eager"  # Opacus' hooks need the module-level attention ops
    hf = transformers.GPT2LMHeadModel(hc).to(device)
    if mode == "hooks":
        gsm = GradSampleModule(hf)

        def run():
            for p in hf.parameters():
                p.grad, p.grad_sample = None, None
            gsm(input_ids=ids, position_ids=pos, labels=ids).loss.backward()

        return run
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids.cpu()), batch_size=B)
    model, opt, crit, _ = PrivacyEngine().make_private(
        module=hf, optimizer=torch.optim.SGD(hf.parameters(), lr=0.1), data_loader=loader,
        criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        poisson_sampling=False)

    def run():
        opt.zero_grad()
        logits = model(input_ids=ids, position_ids=pos).logits[:, :-1]
        crit(logits.reshape(-1, s["vocab"]), ids[:, 1:].reshape(-1), shape=logits.shape).backward()
        opt.step()

    return run


# ---------------------------------------------------------------------------------------------
# (d) generation and (e) fused LM-head cross-entropy
# ---------------------------------------------------------------------------------------------


def bench_generate(args, device):
    from aam_func.generate import generate

    s = args.sizes["generate"]
    hf, cfg, params32 = gpt2(s, device)
    hf.eval()
    model = af.Transformer(cfg)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        params = tree.cast(params32, dtype)
        hfd = hf.to(dtype)
        for B in s["batches"]:
            ids = torch.randint(0, s["vocab"], (B, s["prompt"]), device=device)
            meta = dict(B=B, dtype=str(dtype)[6:], new_tokens=s["new"])
            got = {}
            for compiled in (False, True) if device.type == "cuda" else (False,):
                with case("generate", f"aam_func {'compiled' if compiled else 'eager'} B{B} {meta['dtype']}", **meta) as out:
                    run = lambda: generate(model, params, ids, max_new_tokens=s["new"], compile=compiled)  # noqa: E731
                    got[compiled] = run()
                    out["tokens_per_s"] = B * s["new"] / timed(run, device, args.budget, warmup=0)["s"]
            for cache in ("dynamic", "static"):
                with case("generate", f"transformers {cache} B{B} {meta['dtype']}", **meta) as out:
                    kw = dict(max_new_tokens=s["new"], min_new_tokens=s["new"], do_sample=False, pad_token_id=0)
                    if cache == "static":
                        kw["cache_implementation"] = "static"
                    with torch.no_grad():
                        run = lambda: hfd.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # noqa: E731
                        theirs = run()
                        out["tokens_per_s"] = B * s["new"] / timed(run, device, args.budget, warmup=0)["s"]
                    if dtype == torch.float32 and False in got:
                        out["tokens_equal_aam_func"] = bool(torch.equal(theirs, got[False]))
        hf = hf.float()


def bench_ce(args, device):
    from aam_func.ops.cross_entropy import linear_cross_entropy

    s = args.sizes["ce"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h = torch.randn(s["tokens"], s["d"], device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(s["vocab"], s["d"], device=device, dtype=dtype) * 0.02).requires_grad_()
    y = torch.randint(0, s["vocab"], (s["tokens"],), device=device)
    runs = {"aam_func fused": lambda: linear_cross_entropy(h, w, y),
            "F.linear+F.cross_entropy": lambda: F.cross_entropy(F.linear(h, w).float(), y)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        runs["liger fused"] = lambda: liger(w, h, y)
    except Exception:  # noqa: BLE001 - optional anchor
        emit("ce", "liger fused", status="skipped: liger-kernel not installed")
    for name, fn in runs.items():
        with case("ce", name, dtype=str(dtype)[6:], **s) as out:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            out["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(fn(), (h, w)), device, args.budget)["s"] * 1e3
            if device.type == "cuda":
                out["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---------------------------------------------------------------------------------------------

FULL = {
    "train": dict(vocab=50257, d=768, layers=12, heads=12, seq=1024, batch=8),
    "attention": dict(batch=4, heads=16, dims=(64, 128), lens=(1024, 4096, 16384), variant_lens=(4096,), window=256,
                      block=128, math_max=4096, backends=("triton", "blockwise", "sdpa", "flex", "math")),
    "per_sample": dict(vocab=8192, d=256, layers=4, heads=8, seq=128, batches=(32, 128)),
    "generate": dict(vocab=50257, d=768, layers=12, heads=12, seq=1024, prompt=16, new=128, batches=(1, 8, 32)),
    "ce": dict(tokens=8192, d=768, vocab=50257),
}
SMOKE = {
    "train": dict(vocab=128, d=32, layers=2, heads=2, seq=16, batch=2),
    "attention": dict(batch=1, heads=4, dims=(16,), lens=(16,), variant_lens=(16,), window=8, block=16, math_max=64,
                      backends=("triton", "blockwise", "sdpa", "flex", "math")),
    "per_sample": dict(vocab=128, d=32, layers=1, heads=2, seq=8, batches=(2,)),
    "generate": dict(vocab=128, d=32, layers=2, heads=2, seq=32, prompt=4, new=4, batches=(1, 2)),
    "ce": dict(tokens=64, d=16, vocab=128),
}
GROUPS = {"train": bench_train, "attention": bench_attention, "per_sample": bench_per_sample,
          "generate": bench_generate, "ce": bench_ce}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds): checks the script runs")
    ap.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="groups to run (default: all)")
    ap.add_argument("--budget", type=float, default=None, help="timing seconds per case (default 3; smoke 0.05)")
    ap.add_argument("--compile", action="store_true", help="with --smoke: also the compiled train step")
    ap.add_argument("--device", default=None, help="default: cuda if available (smoke: cpu)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    args.sizes = SMOKE if args.smoke else FULL
    args.budget = args.budget if args.budget is not None else (0.05 if args.smoke else 3.0)
    WARMUP[0] = 0 if args.smoke else 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    emit("meta", "environment", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         torch=torch.__version__, smoke=args.smoke, peak_bf16_flops=peak_flops(device), status="ok")
    torch.manual_seed(0)
    for name in args.only or GROUPS:
        t0 = time.perf_counter()
        try:
            GROUPS[name](args, device)
        except Exception as e:  # noqa: BLE001 - a group that cannot even set up is reported too
            emit(name, "setup", status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        emit(name, "group total", seconds=round(time.perf_counter() - t0, 1), status="ok")


if __name__ == "__main__":
    main()
