"""aam_func on a GPU: every device-dependent code path, against CPU or float64 references.

The rest of the suite runs on CPU only; this file checks what only a GPU exercises: the model,
every attention backend and variant, the custom ops (blockwise attention, RoPE, fused
cross-entropy, remat), autocast bf16/fp16 with the functional loss scaler, torch.compile,
generation with the static cache, optimizers against torch's fused CUDA kernels, per-sample
gradients and DP-SGD with device generators, ensembles, LoRA, transformers interop,
checkpoints, the command line with ``--device cuda`` and data parallelism over nccl.

    python -m pytest tests/test_cuda.py -m cuda                 # on a machine with a GPU
    AAM_CUDA_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py -m cuda   # CPU dry run

Every test is marked ``cuda`` (CI deselects them with ``-m "not slow and not cuda"``). Without
a GPU they fail at setup instead of skipping: a GPU run that silently checks nothing is worse
than a red one. ``AAM_CUDA_TEST_DEVICE=cpu`` runs the same code on the CPU to catch API misuse;
the float16-autocast and nccl-only parts then skip (the nccl test runs on gloo instead).

Two cases run in a subprocess so that a device fault (an illegal memory access poisons the
CUDA context for everything after it) fails only them: the optimizers on torch's fused Adam
kernel, and the single-process nccl group. In-process tests therefore build their Adam with
``inject_hyperparams`` (as the CLI does) or ``fused=False``, which never reach that kernel.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.func import grad, jvp, vmap

import aam_func as af
from aam_func import ensemble, optim, tree
from aam_func import per_sample as ps
from aam_func.checkpoint import load_checkpoint, save_checkpoint
from aam_func.data import BlockLoader
from aam_func.generate import forward_static, generate, init_static_cache, left_pad
from aam_func.ops import registry
from aam_func.ops.attention import RelativeBias, Sparsity, attention
from aam_func.ops.attention import reference as attention_reference
from aam_func.ops.cross_entropy import linear_cross_entropy
from aam_func.ops.cross_entropy import reference as ce_reference
from aam_func.ops.rope import reference as rope_reference
from aam_func.ops.rope import rope
from aam_func.peft import lora
from aam_func.train import make_lm_loss, make_eval_step, make_train_step

DEVICE = os.environ.get("AAM_CUDA_TEST_DEVICE", "cuda")
DEVICE_TYPE = torch.device(DEVICE).type
ON_CUDA = DEVICE_TYPE == "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (float16 autocast / nccl); this is a CPU dry run")


@pytest.fixture(autouse=True)
def _device_ready():
    """Fail (not skip) without a GPU; after each test, wait for the device, so that an
    asynchronous kernel error is reported by the test that launched the kernel."""
    if ON_CUDA and not torch.cuda.is_available():
        pytest.fail("CUDA is not available: tests/test_cuda.py needs a GPU "
                    "(AAM_CUDA_TEST_DEVICE=cpu runs it on the CPU as a dry run)")
    yield
    if ON_CUDA:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- helpers

GPT = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0)
LLAMA = dict(GPT, n_kv_heads=2, position_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
             tie_embeddings=False)
SHAPES = {"gpt2": GPT, "llama": LLAMA}


def dev(x, device=DEVICE):
    """A tensor or a tree of tensors on ``device``."""
    return x.to(device) if isinstance(x, torch.Tensor) else tree.to(x, device)


def cpu(x):
    return dev(x, "cpu")


def on_device(t) -> bool:
    leaves = [t] if isinstance(t, torch.Tensor) else tree.leaves(t)
    return all(x.device.type == DEVICE_TYPE for x in leaves)


def close_trees(a, b, *, rtol, atol, what=""):
    """Leafwise assert_close of two trees (b is moved to a's device)."""
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys(), what
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k].to(fa[k].device), rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


def equal_trees(a, b) -> bool:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k].cpu(), fb[k].cpu()) for k in fa)


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ over all leaves of two trees (or two tensors), in float64."""
    la = [a] if isinstance(a, torch.Tensor) else tree.leaves(a)
    lb = [b] if isinstance(b, torch.Tensor) else tree.leaves(b)
    num = sum(float((x.double().cpu() - y.double().cpu()).pow(2).sum()) for x, y in zip(la, lb, strict=True))
    den = sum(float(y.double().cpu().pow(2).sum()) for y in lb)
    return math.sqrt(num / max(den, 1e-30))


def all_finite(t) -> bool:
    leaves = [t] if isinstance(t, torch.Tensor) else tree.leaves(t)
    return all(bool(torch.isfinite(x).all()) for x in leaves if x.is_floating_point())


def model_and_params(shape="gpt2", dtype=None, **over):
    cfg = af.ModelConfig(**{**SHAPES[shape], **over})
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    if dtype is not None:
        params = tree.cast(params, dtype)
    return model, dev(params)


def lm_batch(seed=0, rows=4, seq=24, vocab=97, pad=False, device=DEVICE):
    """Token ids as input and labels; with ``pad`` row 1 is right-padded and row 2 left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    b = {"input_ids": ids, "labels": ids}
    if pad:
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[1, (2 * seq) // 3:] = 0
        mask[2, :5] = 0
        b["attention_mask"] = mask
    return {k: v.to(device) for k, v in b.items()}


def loss_of(model, **kw):
    return lambda p, b: model.apply(p, **b, **kw)["loss"]


def under_autocast(fn, dtype):
    """``fn`` with its forward under ``torch.autocast(DEVICE, dtype)`` (entered inside, as
    ``make_train_step`` does, so that the backward runs outside it)."""
    def wrapped(*args, **kwargs):
        with torch.autocast(DEVICE_TYPE, dtype=dtype):
            return fn(*args, **kwargs)
    return wrapped


def adamw_opt(params, steps=20, lr=3e-3):
    """Clipping + scheduled AdamW as the CLI builds it (inject_hyperparams: the foreach path)."""
    return optim.adamw_warmup_cosine(params, learning_rate=lr, total_steps=steps, warmup_steps=3, end_value=lr / 10,
                                     weight_decay=0.1, max_grad_norm=1.0)


def device_generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             AAM_CUDA_TEST_DEVICE=DEVICE, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_python(args: list[str], timeout: float = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env), cwd=ROOT)


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit status {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-8000:]}"


# ----------------------------------------------------------------------------- model on the device


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_transformer_logits_loss_and_grads_equal_cpu(shape):
    """Params initialised on the CPU and moved: logits, loss and gradients (with padding) equal
    the CPU's, in float32 and (tightly) in float64."""
    cfg = af.ModelConfig(**SHAPES[shape])
    model = af.Transformer(cfg)
    for dtype, rtol, atol in ((torch.float32, 1e-4, 1e-5), (F64, 1e-9, 1e-10)):
        p_cpu = tree.cast(model.init(seed=0), dtype)
        p = dev(p_cpu)
        assert on_device(p)
        b_cpu = lm_batch(1, pad=True, device="cpu")
        b = dev(b_cpu)
        out, ref = model.apply(p, **b), model.apply(p_cpu, **b_cpu)
        assert on_device(out["logits"]) and out["logits"].dtype == dtype
        torch.testing.assert_close(out["logits"].cpu(), ref["logits"], rtol=rtol, atol=atol)
        torch.testing.assert_close(out["loss"].cpu(), ref["loss"], rtol=rtol, atol=atol)
        g, g_cpu = grad(loss_of(model))(p, b), grad(loss_of(model))(p_cpu, b_cpu)
        assert on_device(g)
        close_trees(g, g_cpu, rtol=rtol, atol=atol, what=f"{shape} {dtype} grads")


@pytest.mark.parametrize("backend", ["sdpa", "blockwise", "auto"])
@pytest.mark.parametrize("attention_type", ["standard", "relative", "local", "sparse"])
def test_model_attention_backends_equal_math(attention_type, backend):
    """Each backend against the math backend on the device (float32, GQA, causal, left and right
    padding): logits and gradients. SDPA refuses relative attention with a clear error."""
    kw = dict(n_kv_heads=2, attention_type=attention_type, max_relative_position=4)
    model_m, params = model_and_params("gpt2", attention_backend="math", **kw)
    model_b = af.Transformer(model_m.cfg.replace(attention_backend=backend))
    b = lm_batch(2, pad=True)
    if backend == "sdpa" and attention_type == "relative":
        with pytest.raises(ValueError, match="sdpa"):
            model_b.apply(params, **b)
        return
    out_m, out_b = model_m.apply(params, **b), model_b.apply(params, **b)
    torch.testing.assert_close(out_b["logits"], out_m["logits"], rtol=1e-4, atol=1e-5)
    g_m, g_b = grad(loss_of(model_m))(params, b), grad(loss_of(model_b))(params, b)
    close_trees(g_b, g_m, rtol=1e-4, atol=1e-6, what=f"{attention_type}/{backend} grads")


def _attention_case(name, g, H, d):
    """(keyword arguments, q_len, k_len) of an op-level attention case."""
    T = 40
    pad = torch.rand(2, T, generator=g) > 0.3
    pad[:, 0] = False  # a padded first key: its query still attends to itself
    cases = {
        "full": (dict(causal=False), T),
        "causal": (dict(causal=True), T),
        "decode_one": (dict(causal=True), 1),
        "causal_pad": (dict(causal=True, key_padding_mask=pad), T),
        "bottom_right_pad": (dict(causal=True, key_padding_mask=pad), 7),
        "local": (dict(causal=True, window=6, key_padding_mask=pad), T),
        "strided": (dict(causal=True, sparsity=Sparsity("strided", stride=4)), T),
        "fixed": (dict(causal=True, sparsity=Sparsity("fixed", stride=4, summary=1)), T),
        "shaw": (dict(causal=True, key_padding_mask=pad,
                      relative_bias=RelativeBias("shaw", torch.randn(7, d, generator=g, dtype=F64), max_distance=3)), T),
        "t5": (dict(causal=False, relative_bias=RelativeBias("t5", torch.randn(H, 8, generator=g, dtype=F64),
                                                             num_buckets=8, max_distance=16)), T),
        "alibi": (dict(causal=True, relative_bias=RelativeBias("alibi", torch.rand(H, generator=g, dtype=F64))), T),
    }
    kw, Tq = cases[name]
    return kw, Tq, T


def _kw_to(kw, device):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
        elif isinstance(v, RelativeBias):
            v = RelativeBias(v.kind, v.table.detach().to(device).requires_grad_(), v.max_distance, v.num_buckets,
                             v.bidirectional)
        out[k] = v
    return out


ATTN_CASES = ["full", "causal", "decode_one", "causal_pad", "bottom_right_pad", "local", "strided", "fixed", "shaw",
              "t5", "alibi"]


@pytest.mark.parametrize("backend", ["math", "sdpa", "blockwise", "auto", "triton"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_op_on_device_equals_float64_reference(case, backend):
    """The op on the device in float64 (GQA 4:2, tiles of 16 over 40 positions) against the
    composite reference on the CPU: output and gradients wrt q, k, v and the relative table;
    for the backends with forward-mode AD (blockwise, math, auto) also the jvp."""
    g = torch.Generator().manual_seed(ATTN_CASES.index(case))
    B, H, Hkv, d = 2, 4, 2, 8
    kw, Tq, Tk = _attention_case(case, g, H, d)
    q = torch.randn(B, H, Tq, d, generator=g, dtype=F64)
    k, v = (torch.randn(B, Hkv, Tk, d, generator=g, dtype=F64) for _ in range(2))
    w = torch.randn(B, H, Tq, d, generator=g, dtype=F64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    rel = kw.get("relative_bias")
    if backend == "sdpa" and rel is not None:
        with pytest.raises(ValueError, match="sdpa"):
            attention(dev(q), dev(k), dev(v), backend="sdpa", **_kw_to(kw, DEVICE))
        return

    def run(fn, device, **extra):
        xs = [x.detach().to(device).requires_grad_() for x in (q, k, v)]
        kwd = _kw_to(kw, device)
        leaves = xs + ([kwd["relative_bias"].table] if rel is not None else [])
        out = fn(*xs, **kwd, **extra)
        gs = torch.autograd.grad((out * w.to(device)).sum(), leaves)
        return [out.detach(), *gs]

    want = run(attention_reference, "cpu")
    got = run(attention, DEVICE, backend=backend, block_q=16, block_k=16)
    assert on_device(got[0])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    if backend == "sdpa":
        return  # SDPA has no forward-mode AD contract; "auto" avoids it under jvp

    def fwd(device, fn, **extra):
        kwd = {k_: (v_.detach() if isinstance(v_, torch.Tensor) else v_) for k_, v_ in _kw_to(kw, device).items()}
        if rel is not None:
            kwd["relative_bias"] = RelativeBias(rel.kind, rel.table.to(device), rel.max_distance, rel.num_buckets,
                                                rel.bidirectional)
        return jvp(lambda q_, k_, v_: fn(q_, k_, v_, **kwd, **extra), tuple(x.to(device) for x in (q, k, v)),
                   tuple(t.to(device) for t in tangents))

    _, t_got = fwd(DEVICE, attention, backend=backend, block_q=16, block_k=16)
    _, t_want = fwd("cpu", attention_reference)
    torch.testing.assert_close(t_got.cpu(), t_want, rtol=1e-9, atol=1e-10)


TRITON_VARIANTS = ["causal", "window", "alibi", "gqa", "padding", "block_sparse"]


def _triton_variant(variant, B, H, T, g):
    kw, Hkv = {"causal": True}, H
    if variant == "window":
        kw["window"] = 256
    elif variant == "alibi":
        kw["relative_bias"] = RelativeBias("alibi", torch.exp2(-8.0 * torch.arange(1, H + 1, device=DEVICE) / H))
    elif variant == "gqa":
        Hkv = H // 4
    elif variant == "padding":
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[0, : T // 3] = False
        kw["key_padding_mask"] = pad.to(DEVICE)
    elif variant == "block_sparse":
        n = T // 128
        kw["sparsity"] = Sparsity("block", block_size=128, layout=torch.rand(n, n, generator=g) < 0.3)
    return kw, Hkv


@cuda_only
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("variant", TRITON_VARIANTS)
def test_triton_attention_bf16_at_real_shapes(variant, d):
    """The Triton kernels compiled for the GPU at B 2, H 8, T 2048, bf16: output, gradients and
    jvp tangent against the float32 reference, and O(T) extra memory in the forward."""
    from aam_func.ops.attention.triton import attention_jvp, triton_attention

    g = torch.Generator().manual_seed(TRITON_VARIANTS.index(variant) + d)
    B, H, T = 2, 8, 2048
    kw, Hkv = _triton_variant(variant, B, H, T, g)
    q = torch.randn(B, H, T, d, generator=g).to(DEVICE)
    k, v = (torch.randn(B, Hkv, T, d, generator=g).to(DEVICE) for _ in range(2))
    w = torch.randn(B, H, T, d, generator=g).to(DEVICE)
    xs16 = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    xs32 = [x.to(torch.bfloat16).float().requires_grad_() for x in (q, k, v)]
    out = triton_attention(*xs16, **kw)
    ref = attention_reference(*xs32, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(torch.autograd.grad((out.float() * w).sum(), xs16), torch.autograd.grad((ref * w).sum(), xs32)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
    ts = [torch.randn_like(x) * 0.1 for x in xs32]
    _, t_fused = attention_jvp(*(x.detach() for x in xs16), *(t.to(torch.bfloat16) for t in ts), **kw)
    _, t_ref = jvp(lambda a, b, c: attention_reference(a, b, c, **kw), tuple(x.detach() for x in xs32), tuple(ts))
    torch.testing.assert_close(t_fused.float(), t_ref, rtol=5e-2, atol=5e-2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        triton_attention(*xs16, **kw)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < B * H * T * T * 2 // 8, f"forward took {extra} bytes beyond its inputs: not O(T)"


@cuda_only
def test_triton_attention_vmap_grad_and_compile_on_device():
    """Per-example gradients (vmap folded into the grid) and a compiled (fullgraph) gradient on
    the GPU, float32, against the reference."""
    from aam_func.ops.attention.triton import triton_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 4, 256, 64, generator=g).to(DEVICE) for _ in range(3))
    loss = lambda fn: lambda a, b, c: (fn(a, b, c, causal=True, window=100) ** 2).sum()  # noqa: E731
    got = vmap(grad(loss(triton_attention), argnums=(0, 1, 2)))(q, k, v)
    want = vmap(grad(loss(attention_reference), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(grad(loss(triton_attention), argnums=(0, 1, 2)), fullgraph=True)(q[0], k[0], v[0])
    for a, b in zip(compiled, grad(loss(attention_reference), argnums=(0, 1, 2))(q[0], k[0], v[0])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def _sample_to_device(args, kwargs):
    def mv(x):
        if isinstance(x, torch.Tensor):
            y = x.detach().to(DEVICE)
            return y.requires_grad_() if x.requires_grad else y
        return x

    return [mv(a) for a in args], {k: mv(v) for k, v in kwargs.items()}


def _outs(o):
    return (o,) if isinstance(o, torch.Tensor) else tuple(x for x in o if isinstance(x, torch.Tensor))


@pytest.mark.parametrize("spec", registry.all_specs(), ids=[s.name for s in registry.all_specs()])
def test_registered_ops_on_device_equal_their_reference(spec):
    """Every registered custom op (attention, rope, linear_cross_entropy, remat) on its float64
    samples moved to the device: values and gradients equal the reference on the CPU, the jvp
    rule equals forward-mode AD of the reference, vmap(grad(op)) equals vmap(grad(reference)),
    and gradcheck (fast mode, forward AD, batched grads) passes on the device."""
    gen = torch.Generator().manual_seed(0)
    for args_cpu, kwargs_cpu in spec.samples():
        args, kwargs = _sample_to_device(args_cpu, kwargs_cpu)
        diff = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad]

        def bind(fn, a, kw):
            def call(*xs):
                full = list(a)
                for i, x in zip(diff, xs):
                    full[i] = x
                return fn(*full, **kw)
            return call

        op = bind(spec.call, args, kwargs)
        ref = bind(spec.reference, args_cpu, kwargs_cpu)
        xs, xs_cpu = [args[i] for i in diff], [args_cpu[i] for i in diff]
        o_op, o_ref = _outs(op(*xs)), _outs(ref(*xs_cpu))
        assert all(on_device(o) for o in o_op)
        cots = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in o_ref]
        for a, b in zip(o_op, o_ref, strict=True):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-10, atol=1e-10)
        g_op = torch.autograd.grad(o_op, xs, [c.to(DEVICE) for c in cots], allow_unused=True)
        g_ref = torch.autograd.grad(o_ref, xs_cpu, cots, allow_unused=True)
        for a, b in zip(g_op, g_ref):
            if a is None or b is None:
                assert (a if b is None else b) is None or (a if b is None else b).abs().max() == 0
                continue
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        if spec.supports_forward_ad:
            tans = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs_cpu]
            _, t_op = jvp(op, tuple(x.detach() for x in xs), tuple(t.to(DEVICE) for t in tans))
            _, t_ref = jvp(ref, tuple(x.detach() for x in xs_cpu), tuple(tans))
            for a, b in zip(_outs(t_op), _outs(t_ref), strict=True):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        # vmap(grad) over two perturbed copies of the differentiated inputs
        batched_cpu = [torch.stack([x.detach(), x.detach() + 0.01 * torch.randn(x.shape, generator=gen, dtype=x.dtype)])
                       for x in xs_cpu]

        def loss(fn, cot):
            return lambda *ys: sum((o * c).sum() for o, c in zip(_outs(fn(*ys)), cot))

        argnums = tuple(range(len(diff)))
        v_op = vmap(grad(loss(op, [c.to(DEVICE) for c in cots]), argnums=argnums))(*[dev(x) for x in batched_cpu])
        v_ref = vmap(grad(loss(ref, cots), argnums=argnums))(*batched_cpu)
        for a, b in zip(v_op, v_ref, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        assert torch.autograd.gradcheck(op, tuple(xs), fast_mode=True, check_forward_ad=spec.supports_forward_ad,
                                        check_batched_grad=True)


# ----------------------------------------------------------------------------- RoPE, fused CE, remat


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_on_device_equals_cpu_and_reference(layout):
    """RoPE on the device for (batch, seq) positions, (seq,) positions and an int offset, plain and
    NTK-scaled: values equal the CPU and the reference; the backward (the inverse rotation) and
    the jvp equal the reference's; bf16 equals the bf16 reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=g)
    w = torch.randn(2, 4, 16, 8, generator=g)
    pos_b = torch.stack([torch.arange(16), torch.arange(16) + 5])
    for positions, scaling in ((pos_b, None), (torch.arange(3, 19), None), (7, None), (pos_b, ("ntk", 4.0)),
                               (torch.arange(16), {"type": "linear", "factor": 2.0})):
        kw = dict(layout=layout, scaling=scaling)
        p_dev = positions.to(DEVICE) if isinstance(positions, torch.Tensor) else positions
        y_cpu = rope(x, positions, **kw)
        xd = dev(x.detach()).requires_grad_()
        y = rope(xd, p_dev, **kw)
        assert on_device(y)
        torch.testing.assert_close(y.detach().cpu(), y_cpu, rtol=1e-6, atol=1e-6)
        xr = dev(x.detach()).requires_grad_()
        y_ref = rope_reference(xr, p_dev, **kw)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        (gx,) = torch.autograd.grad((y * dev(w)).sum(), xd)
        (gr,) = torch.autograd.grad((y_ref * dev(w)).sum(), xr)
        torch.testing.assert_close(gx, gr, rtol=1e-6, atol=1e-6)
        _, t = jvp(lambda a: rope(a, p_dev, **kw), (dev(x),), (dev(w),))
        _, t_ref = jvp(lambda a: rope_reference(a, p_dev, **kw), (dev(x),), (dev(w),))
        torch.testing.assert_close(t, t_ref, rtol=1e-6, atol=1e-6)
    xb = dev(x).bfloat16()
    torch.testing.assert_close(rope(xb, dev(pos_b), layout=layout), rope_reference(xb, dev(pos_b), layout=layout),
                               rtol=2e-2, atol=1e-2)


def test_fused_cross_entropy_on_device_equals_float64_reference():
    """linear_cross_entropy on the device (chunked; bias, smoothing, z-loss, ignored targets, all
    reductions) against the composite reference on the CPU: loss, gradients by eager autograd
    and by torch.func.grad, and the jvp; bf16 inputs accumulate in float32."""
    g = torch.Generator().manual_seed(0)
    N, V, d = 37, 50, 16
    h, w, bias = (torch.randn(*s, generator=g, dtype=F64) for s in ((N, d), (V, d), (V,)))
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 10, 11]] = -100
    for kw in (dict(chunk_size=8), dict(chunk_size=5, label_smoothing=0.1, z_loss=1e-3, bias=True),
               dict(reduction="sum", chunk_size=64, bias=True), dict(reduction="none", chunk_size=7)):
        kw = dict(kw)
        use_bias = kw.pop("bias", False)
        red = kw.get("reduction", "mean")
        cot = torch.randn(N, generator=g, dtype=F64) if red == "none" else torch.tensor(1.3, dtype=F64)

        def run(fn, device):
            leaves = [x.detach().to(device).requires_grad_() for x in ((h, w, bias) if use_bias else (h, w))]
            b = leaves[2] if use_bias else None
            loss = fn(leaves[0], leaves[1], t.to(device), bias=b, **kw)
            return [loss.detach(), *torch.autograd.grad(loss, leaves, cot.to(device))]

        want, got = run(ce_reference, "cpu"), run(linear_cross_entropy, DEVICE)
        assert on_device(got[0])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        if red != "none":  # one torch.func.grad level: the precomputed-gradient path
            gf = grad(lambda hh, ww: linear_cross_entropy(hh, ww, t.to(DEVICE), bias=dev(bias) if use_bias else None,
                                                          **kw) * 1.3, argnums=(0, 1))(dev(h), dev(w))
            for a, b in zip(gf, want[1:3]):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        th, tw = torch.randn_like(h), torch.randn_like(w)
        b_dev = dev(bias) if use_bias else None
        _, t_got = jvp(lambda hh, ww: linear_cross_entropy(hh, ww, t.to(DEVICE), bias=b_dev, **kw),
                       (dev(h), dev(w)), (dev(th), dev(tw)))
        _, t_want = jvp(lambda hh, ww: ce_reference(hh, ww, t, bias=bias if use_bias else None, **kw), (h, w), (th, tw))
        torch.testing.assert_close(t_got.cpu(), t_want, rtol=1e-10, atol=1e-10)
    hb, wb = (dev(x).float().bfloat16().requires_grad_() for x in (h, w))
    lb = linear_cross_entropy(hb, wb, t.to(DEVICE), chunk_size=8)
    lb.backward()
    assert lb.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lb.cpu(), ce_reference(h.float(), w.float(), t), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_model_fused_loss_equals_logits_loss(shape):
    """return_logits=False (the chunked LM-head loss, logits never formed) equals the loss from
    logits on the device: loss and gradients in float32, and closely under bf16 autocast."""
    model, params = model_and_params(shape)
    b = lm_batch(3, pad=True)
    fused, plain = loss_of(model, return_logits=False), loss_of(model)
    assert model.apply(params, **b, return_logits=False)["logits"] is None
    torch.testing.assert_close(fused(params, b), plain(params, b), rtol=1e-5, atol=1e-6)
    close_trees(grad(fused)(params, b), grad(plain)(params, b), rtol=1e-4, atol=1e-6, what="fused CE grads")
    fused, plain = under_autocast(fused, torch.bfloat16), under_autocast(plain, torch.bfloat16)
    lf, lp = fused(params, b), plain(params, b)
    gf, gp = grad(fused)(params, b), grad(plain)(params, b)
    assert lf.dtype == torch.float32 and all_finite(gf)
    torch.testing.assert_close(lf, lp, rtol=2e-2, atol=2e-2)
    assert rel_err(gf, gp) < 5e-2


def test_remat_replays_device_randomness_and_equals_plain():
    """gradient_checkpointing with dropout on the device: the recomputation replays the masks of
    the global (CUDA) RNG and of a device generator, so gradients equal the plain model's, and
    the RNG ends where the plain run leaves it."""
    cfg = af.ModelConfig(**{**GPT, "dropout": 0.1})
    b = lm_batch(4)
    plain, ckpt = af.Transformer(cfg), af.Transformer(cfg.replace(gradient_checkpointing=True))
    params = dev(plain.init(seed=0))

    def global_rng(model):
        torch.manual_seed(123)
        gr = grad(lambda p: model.apply(p, **b, train=True)["loss"])(params)
        state = torch.cuda.get_rng_state() if ON_CUDA else torch.get_rng_state()
        return gr, state

    (g_plain, s_plain), (g_ckpt, s_ckpt) = global_rng(plain), global_rng(ckpt)
    close_trees(g_ckpt, g_plain, rtol=1e-5, atol=1e-7, what="remat (global RNG)")
    assert torch.equal(s_ckpt, s_plain)

    def with_generator(model):
        gen = device_generator(7)
        return grad(lambda p: model.apply(p, **b, train=True, generator=gen)["loss"])(params), gen.get_state()

    (g_plain, s_plain), (g_ckpt, s_ckpt) = with_generator(plain), with_generator(ckpt)
    close_trees(g_ckpt, g_plain, rtol=1e-5, atol=1e-7, what="remat (device generator)")
    assert torch.equal(s_ckpt, s_plain)
    # eager autograd too (not only torch.func.grad)
    torch.manual_seed(5)
    pr = tree.map(lambda x: x.detach().requires_grad_(), params)
    ckpt.apply(pr, **b, train=True)["loss"].backward()
    torch.manual_seed(5)
    pp = tree.map(lambda x: x.detach().requires_grad_(), params)
    plain.apply(pp, **b, train=True)["loss"].backward()
    close_trees(tree.map(lambda x: x.grad, pr), tree.map(lambda x: x.grad, pp), rtol=1e-5, atol=1e-7, what="eager")


AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16", marks=cuda_only)]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_remat_under_autocast_equals_plain(dtype):
    """With gradient_checkpointing under autocast the gradients must be those of the plain model
    under the same autocast (the recomputation must run in the forward's precision)."""
    cfg = af.ModelConfig(**{**GPT, "attention_backend": "math"})
    b = lm_batch(5)
    grads = []
    for ck in (False, True):
        model = af.Transformer(cfg.replace(gradient_checkpointing=ck))
        params = dev(model.init(seed=0))
        grads.append(grad(under_autocast(loss_of(model), dtype))(params, b))
    close_trees(grads[1], grads[0], rtol=1e-5, atol=1e-7, what="remat under autocast")


# ----------------------------------------------------------------------------- mixed precision and training


@pytest.mark.parametrize("backend", ["auto", "math", "blockwise", "sdpa"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_forward_backward_close_to_fp32(dtype, backend):
    """Under torch.autocast(device, dtype) every backend runs forward and backward (GQA, padding):
    low-precision logits, a float32 loss, finite float32 gradients, all close to float32."""
    model, params = model_and_params("llama", attention_backend=backend)
    b = lm_batch(6, pad=True)
    loss = loss_of(model)
    l32, g32 = loss(params, b), grad(loss)(params, b)
    out = under_autocast(model.apply, dtype)(params, **b)
    glp = grad(under_autocast(loss, dtype))(params, b)
    assert out["logits"].dtype == dtype and out["loss"].dtype == torch.float32
    assert all_finite(glp) and all(x.dtype == torch.float32 for x in tree.leaves(glp))
    torch.testing.assert_close(out["loss"], l32, rtol=3e-2, atol=3e-2)
    assert rel_err(glp, g32) < 5e-2


def test_train_step_bf16_keeps_fp32_masters_and_learns():
    model, params = model_and_params("gpt2")
    b = lm_batch(7)
    f32 = make_train_step(make_lm_loss(model), adamw_opt(params))
    b16 = make_train_step(make_lm_loss(model), adamw_opt(params), precision="bf16")
    _, _, m32 = f32(params, f32.init(params), b)
    p, s, m = b16(params, b16.init(params), b)
    assert float(m["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(m["loss"]) != float(m32["loss"])  # bf16 really ran
    assert float(m["grad_norm"]) == pytest.approx(float(m32["grad_norm"]), rel=5e-2)
    losses = [float(m["loss"])]
    for _ in range(14):
        p, s, m = b16(p, s, b)
        losses.append(float(m["loss"]))
    assert all(x.dtype == torch.float32 for x in tree.leaves(p)) and on_device(p) and all_finite(p)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    ev32 = make_eval_step(make_lm_loss(model, train=False))(p, b)
    ev16 = make_eval_step(make_lm_loss(model, train=False), precision="bf16")(p, b)
    assert float(ev16["loss"]) == pytest.approx(float(ev32["loss"]), rel=2e-2)


@cuda_only
def test_train_step_fp16_loss_scaling_learns():
    """precision='fp16': autocast float16 and the functional loss scaler; a few steps learn,
    params stay float32 master weights, nothing becomes NaN."""
    model, params = model_and_params("gpt2")
    b = lm_batch(8)
    step = make_train_step(make_lm_loss(model), adamw_opt(params), precision="fp16", loss_scale={"init_scale": 2.0**12})
    p, s = params, step.init(params)
    losses = []
    for _ in range(15):
        p, s, m = step(p, s, b)
        losses.append(float(m["loss"]))
        assert float(m["loss_scale"]) > 0
    assert all(x.dtype == torch.float32 for x in tree.leaves(p)) and on_device(p) and all_finite(p)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    assert math.isfinite(float(optim.loss_scale(s)))


@cuda_only
def test_fp16_overflow_skips_the_step_and_backs_off():
    """A loss scale so large that the float16 backward overflows: the step is skipped (params
    and the inner optimizer state unchanged), the scale halves, the logged loss stays finite."""
    model, params = model_and_params("gpt2")
    b = lm_batch(9)
    step = make_train_step(make_lm_loss(model), adamw_opt(params), precision="fp16", loss_scale={"init_scale": 2.0**100})
    state = step.init(params)
    p1, s1, m1 = step(params, state, b)
    assert equal_trees(p1, params)
    assert equal_trees(s1["inner"], state["inner"])
    assert float(optim.loss_scale(s1)) == 2.0**99 and float(m1["loss_scale"]) == 2.0**100
    assert math.isfinite(float(m1["loss"]))
    p2, s2, _ = step(p1, s1, b)  # still overflowing: skipped again, scale halves again
    assert equal_trees(p2, params) and float(optim.loss_scale(s2)) == 2.0**98


def test_accumulation_and_dropout_with_a_device_generator():
    """accumulate=2 equals the full batch on the device; dropout drawn from a device generator
    is reproducible (same seed, same step) and depends on the seed."""
    model, params = model_and_params("gpt2")
    b = lm_batch(10, rows=8)
    full = make_train_step(make_lm_loss(model), optim.sgd(0.5))
    acc = make_train_step(make_lm_loss(model), optim.sgd(0.5), accumulate=2)
    p1, _, m1 = full(params, full.init(params), b)
    p2, _, m2 = acc(params, acc.init(params), b)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    close_trees(p2, p1, rtol=1e-5, atol=1e-6, what="accumulate")
    drop = af.Transformer(model.cfg.replace(dropout=0.1))
    step = make_train_step(make_lm_loss(drop), optim.sgd(0.5))
    a, _, ma = step(params, step.init(params), b, device_generator(1))
    a2, _, _ = step(params, step.init(params), b, device_generator(1))
    c, _, mc = step(params, step.init(params), b, device_generator(2))
    close_trees(a2, a, rtol=1e-6, atol=1e-7, what="same dropout seed")
    assert float(ma["loss"]) != float(mc["loss"]) and not equal_trees(a, c)
    assert float(ma["loss"]) != float(m1["loss"])  # dropout really ran


def test_compiled_train_step_matches_eager():
    """compile=True traces grads, clipping and the optimizer on the device; 3 steps equal eager."""
    model, params = model_and_params("gpt2", n_layers=1)
    eager = make_train_step(make_lm_loss(model), adamw_opt(params))
    comp = make_train_step(make_lm_loss(model), adamw_opt(params), compile=True)
    pe, se = params, eager.init(params)
    pc, sc = params, comp.init(params)
    for i in range(3):
        b = lm_batch(20 + i)
        pe, se, me = eager(pe, se, b)
        pc, sc, mc = comp(pc, sc, b)
        assert float(mc["loss"]) == pytest.approx(float(me["loss"]), rel=1e-4)
    assert on_device(pc)
    close_trees(pc, pe, rtol=1e-4, atol=1e-5, what="compiled step")


def test_compat_pipeline_mixed_precision_on_device():
    """The guide's class API on the device: config.mixed_precision picks bf16 (the GPU supports
    it), dropout draws from a device generator, parameters stay float32 on the device."""
    from aam_func.compat import AdvancedTrainingPipeline, AdvancedTransformerModel

    cfg = af.ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mixed_precision=True,
                         dropout=0.1, warmup_steps=0)
    model = AdvancedTransformerModel(cfg, seed=0).to(DEVICE)
    pipe = AdvancedTrainingPipeline(model, cfg, num_training_steps=4)
    assert pipe.precision == "bf16"
    b = {"input_ids": torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)}
    before = model.get_parameter("blocks.0.mlp.fc.weight").detach().clone()
    m1, m2 = pipe.train_step(b), pipe.train_step(b)
    assert math.isfinite(m1["loss"]) and math.isfinite(m2["loss"]) and m2["step"] == 2
    w = model.get_parameter("blocks.0.mlp.fc.weight")
    assert w.dtype == torch.float32 and on_device(w) and not torch.equal(w.detach(), before)
    assert math.isfinite(pipe.evaluate_step(b)["loss"])


# ----------------------------------------------------------------------------- generation


def _gen_model(**kw):
    cfg = af.ModelConfig(vocab_size=211, d_model=32, n_layers=2, n_heads=4, max_seq_len=160, dropout=0.0,
                         position_encoding="rope", n_kv_heads=2, **kw)
    m = af.Transformer(cfg)
    return m, dev(m.init(seed=0))


def test_greedy_static_cache_equals_dynamic_and_no_cache():
    m, p = _gen_model()
    x = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a = generate(m, p, x, max_new_tokens=48)  # static cache (the default)
    b = generate(m, p, x, max_new_tokens=48, use_cache=False)
    c = generate(m, p, x, max_new_tokens=48, cache="dynamic")
    assert a.shape == (2, 57) and on_device(a)
    assert torch.equal(a, b) and torch.equal(c, b) and torch.equal(a[:, :9], x)
    # a left-padded batch generates what each prompt generates alone
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    ids, mask = left_pad(prompts, pad_token_id=0)
    batch = generate(m, p, ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=16)
    for i, pr in enumerate(prompts):
        alone = generate(m, p, torch.tensor([pr], device=DEVICE), max_new_tokens=16)
        assert torch.equal(batch[i, ids.shape[1] - len(pr):], alone[0])


def test_static_cache_step_equals_the_full_forward():
    m, p = _gen_model()
    x = torch.randint(1, 211, (2, 5), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=DEVICE)
    cache = init_static_cache(m, 2, 16, device=DEVICE)
    logits, c1 = forward_static(m, p, x, cache, mask)
    assert int(cache["length"]) == 0 and float(cache["kv"][0][0].abs().sum()) == 0  # input untouched
    assert on_device(c1["kv"][0][0]) and int(c1["length"]) == 5 and c1["next_pos"].tolist() == [3, 5]
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    l2, c2 = forward_static(m, p, nxt, c1, validate=False)
    ids = torch.cat([x, nxt], 1)
    m6 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, device=DEVICE)], 1)
    full = m.apply(p, ids, attention_mask=m6, position_ids=(m6.cumsum(1) - 1).clamp(min=0))["logits"][:, -1]
    torch.testing.assert_close(l2[:, -1], full, rtol=1e-5, atol=1e-5)


def test_sampling_with_device_generators_is_reproducible():
    m, p = _gen_model()
    x = torch.randint(0, 211, (3, 4), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kw = dict(max_new_tokens=25, do_sample=True, temperature=1.5, top_k=100, top_p=0.95, repetition_penalty=1.3)
    a, b, c = generate(m, p, x, seed=5, **kw), generate(m, p, x, seed=5, **kw), generate(m, p, x, seed=6, **kw)
    assert on_device(a) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, generate(m, p, x, seed=5, cache="dynamic", **kw))
    d = generate(m, p, x, generator=device_generator(7), **kw)
    assert torch.equal(d, generate(m, p, x, generator=device_generator(7), **kw))
    eos = int(a[1, 6])
    e = generate(m, p, x, eos_token_id=eos, pad_token_id=3, seed=5, **kw)
    row = a[1, 4:].tolist()
    n = row.index(eos) + 1  # row 1 keeps its tokens up to and including its first eos, then pads
    assert e[1, 4:4 + n].tolist() == row[:n] and bool((e[1, 4 + n:] == 3).all())


def test_compiled_decode_equals_eager():
    """generate(compile=True): the static-cache decode step compiled once per (padding, shape)
    gives the same tokens as eager, with and without left padding."""
    from torch._dynamo.utils import counters

    m, p = _gen_model()
    ids, mask = left_pad([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]], pad_token_id=0)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    torch._dynamo.reset()
    counters.clear()
    for kw in (dict(attention_mask=mask), dict()):
        want = generate(m, p, ids, max_new_tokens=30, **kw)
        assert torch.equal(generate(m, p, ids, max_new_tokens=30, compile=True, **kw), want)
        assert torch.equal(generate(m, p, ids, max_new_tokens=20, compile=True, **kw), want[:, :28])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


# ----------------------------------------------------------------------------- optimizers (subprocess)

OPTIM_SCRIPT = r"""
import os
import traceback
import torch
from aam_func import optim, tree

DEVICE = os.environ["AAM_CUDA_TEST_DEVICE"]
calls = []
real_fused = torch._fused_adam_


def spy(*args, **kwargs):
    calls.append(args[0][0].device.type)
    return real_fused(*args, **kwargs)


torch._fused_adam_ = spy  # read at call time by aam_func.optim.aliases (torch's AdamW uses _fused_adamw_)
g = torch.Generator().manual_seed(0)
params = {"w": torch.randn(33, 17, generator=g), "b": torch.randn(17, generator=g),
          "emb": {"weight": torch.randn(50, 8, generator=g)}, "ln": {"weight": torch.randn(8, generator=g)}}
grads = [tree.map(lambda p: torch.randn(p.shape, generator=g), params) for _ in range(5)]


def ours(opt, state_to_device):
    p = tree.to(params, DEVICE)
    s = opt.init(p)
    if state_to_device:  # what the CLI and a resumed run do: the whole state on the device
        s = tree.to(s, DEVICE)
    for gr in grads:
        u, s = opt.update(tree.to(gr, DEVICE), s, p)
        p = optim.apply_updates(p, u)
    assert all(x.device.type == torch.device(DEVICE).type for x in tree.leaves(p))
    return tree.flatten(p)


def theirs(cls, **kw):
    ts = {k: torch.nn.Parameter(v.clone().to(DEVICE)) for k, v in tree.flatten(params).items()}
    o = cls(list(ts.values()), **kw)
    for gr in grads:
        fg = tree.flatten(gr)
        for k, t in ts.items():
            t.grad = fg[k].to(DEVICE).clone()
        o.step()
    return {k: t.detach() for k, t in ts.items()}


failed = []


def case(name, got, want, fused=None, rtol=1e-5, atol=1e-7):
    n = len(calls)
    try:
        a, b = got(), want()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        if fused is True:
            assert len(calls) > n, "the fused kernel was not used"
        if fused is False:
            assert len(calls) == n, "the fused kernel was used"
        print("ok  ", name, flush=True)
    except Exception:
        failed.append(name)
        print("FAIL", name, flush=True)
        traceback.print_exc()
        if torch.device(DEVICE).type == "cuda":
            torch.cuda.synchronize()  # an asynchronous fault surfaces here, in its own case


adamw_ref = lambda: theirs(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, fused=True)
case("adamw, fused kernel, state on the device", lambda: ours(optim.adamw(1e-2, weight_decay=0.1), True), adamw_ref,
     fused=True)
case("adamw fused=False (foreach)", lambda: ours(optim.adamw(1e-2, weight_decay=0.1, fused=False), True),
     lambda: theirs(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, foreach=True), fused=False)
case("adam (coupled L2), fused kernel, state on the device", lambda: ours(optim.adam(1e-2, weight_decay=0.01), True),
     lambda: theirs(torch.optim.Adam, lr=1e-2, weight_decay=0.01, foreach=True))
case("sgd nesterov momentum", lambda: ours(optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2), True),
     lambda: theirs(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=True))
sched = optim.warmup_cosine(1e-2, 2, 5)
foreach_sched = lambda: ours(optim.adamw(sched, weight_decay=0.1, fused=False), False)
case("scheduled adamw, fused kernel, state from init == foreach",
     lambda: ours(optim.adamw(sched, weight_decay=0.1), False), foreach_sched, fused=True)
# the scheduled learning rate is then a float64 tensor on the device, handed to the kernel
case("scheduled adamw, fused kernel, state on the device == foreach",
     lambda: ours(optim.adamw(sched, weight_decay=0.1), True), foreach_sched, fused=True)
# last, as it is the riskiest: a state from opt.init(params) keeps its step count on the CPU,
# and torch's fused CUDA kernel reads the step through a device pointer
case("adamw, fused kernel, state from init (step count on the CPU)",
     lambda: ours(optim.adamw(1e-2, weight_decay=0.1), False), adamw_ref, fused=True)
print("FAILED: " + "; ".join(failed) if failed else "OK", flush=True)
raise SystemExit(1 if failed else 0)
"""


def test_optimizers_match_torch_optim_on_device():
    """adamw/adam on torch's fused Adam kernel (asserted to be used), adamw with fused=False
    (foreach), SGD with Nesterov momentum, and a scheduled learning rate: 5 steps on device
    params equal torch.optim's fused/foreach optimizers on the same device. In a subprocess."""
    r = run_python(["-c", OPTIM_SCRIPT], timeout=240)
    assert_ok(r)
    assert r.stdout.rstrip().endswith("OK")


# ----------------------------------------------------------------------------- per-sample, DP-SGD, ensembles


@pytest.mark.parametrize("backend,pad", [("math", True), ("blockwise", True), ("auto", False)],
                         ids=["math-padded", "blockwise-padded", "auto-sdpa-unpadded"])
def test_per_sample_grads_norms_and_clipped_sum_equal_a_loop(backend, pad):
    """per_sample.grads by the ghost route (auto) and by vmap, norms and the clipped sum, on the
    device, against a Python loop of torch.func.grad over single examples. 'auto' without padding
    runs SDPA under vmap."""
    model, params = model_and_params("gpt2", attention_backend=backend, max_seq_len=16)
    B = 4
    b = lm_batch(11, rows=B, seq=10, pad=pad)
    loss = loss_of(model)
    loop = [grad(loss)(params, {k: v[i:i + 1] for k, v in b.items()}) for i in range(B)]
    for method in ("auto", "vmap"):
        g = ps.grads(loss, params, b, chunk_size=2, method=method)
        assert tree.names(g) == tree.names(params) and on_device(g)
        for i in range(B):
            close_trees(tree.map(lambda x: x[i], g), loop[i], rtol=1e-4, atol=1e-5, what=f"{method} example {i}")
    want_norms = torch.stack([torch.cat([x.flatten() for x in tree.leaves(r)]).norm() for r in loop])
    for method in ("ghost", "vmap"):
        torch.testing.assert_close(ps.norms(loss, params, b, method=method, chunk_size=3), want_norms,
                                   rtol=1e-4, atol=1e-6)
        res = ps.clipped_sum(loss, params, b, 0.3, method=method, chunk_size=3)
        w = (0.3 / (want_norms + 1e-6)).clamp(max=1.0)
        want = tree.map(lambda *xs: sum(w[i] * xs[i] for i in range(B)), *loop)
        close_trees(res.sum, want, rtol=1e-4, atol=1e-5, what=f"clipped sum ({method})")


def test_dp_sgd_noise_from_a_device_generator():
    """dp_sgd on the device: the noise is σC·N(0, 1) drawn from the given device generator in
    the params' order, the same generator seed gives the same step."""
    model, params = model_and_params("gpt2", max_seq_len=16)
    b = lm_batch(12, rows=4, seq=10)
    loss = loss_of(model)
    opt = optim.sgd(1.0)
    C, sigma, n = 0.5, 1.3, 6.0
    step = ps.dp_sgd(loss, opt, max_norm=C, noise_multiplier=sigma, expected_batch_size=n)
    new, _, info = step(params, opt.init(params), b, device_generator(5))
    assert on_device(new) and info.batch_size == 4 and on_device(info.norms)
    clipped = ps.clipped_sum(loss, params, b, C).sum
    gen = device_generator(5)
    noise = tree.map(lambda x: sigma * C * torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device), params)
    expected = tree.map(lambda p, s, z: p - (s + z) / n, params, clipped, noise)
    close_trees(new, expected, rtol=1e-5, atol=1e-6, what="dp_sgd")
    again, _, _ = step(params, opt.init(params), b, device_generator(5))
    # not bitwise: the ghost route's embedding rows go through index_add_, whose CUDA kernel adds
    # repeated token ids in no fixed order
    close_trees(again, new, rtol=1e-6, atol=1e-7, what="dp_sgd again")


def test_dp_aggregate_noise_on_device_grads():
    """dp_aggregate (the Optax-shaped transform) on per-example gradients that live on the device:
    its noise must be drawn on their device; same state, same noise; next step, new noise."""
    model, params = model_and_params("gpt2", max_seq_len=16)
    b = lm_batch(13, rows=3, seq=8)
    per = ps.grads(loss_of(model), params, b)
    t = ps.dp_aggregate(0.5, 2.0, seed=3)
    s0 = t.init(params)
    a, s1 = t.update(per, s0, params)
    a2, _ = t.update(per, s0, params)
    c, _ = t.update(per, s1, params)
    assert on_device(a) and equal_trees(a, a2) and not equal_trees(a, c)


def test_ensemble_vmapped_training_equals_each_member_alone():
    """Three members trained at once by vmap on the device (float64 AdamW) equal each member
    trained alone on the device; ensemble.apply gives each member's logits."""
    model, _ = model_and_params("gpt2", max_seq_len=16)
    loss = loss_of(model)
    opt = optim.adamw(1e-2, weight_decay=0.1, fused=False)  # the alone-loop stays off the fused kernel (see top)
    seeds = [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    batches = [dev(torch.randint(0, 97, (3, 12), generator=g)) for _ in range(3)]
    params = dev(ensemble.init(model, seeds, dtype=F64))
    state = ensemble.init_state(opt, params)
    step = ensemble.train_step(loss, opt)
    for ids in batches:
        params, state, losses = step(params, state, {"input_ids": ids, "labels": ids})
        assert losses.shape == (3,) and on_device(losses)
    assert on_device(params)
    for m, seed in enumerate(seeds):
        p = dev(tree.cast(model.init(seed=seed), F64))
        s = opt.init(p)
        for ids in batches:
            gr = grad(loss)(p, {"input_ids": ids, "labels": ids})
            u, s = opt.update(gr, s, p)
            p = optim.apply_updates(p, u)
        close_trees(tree.map(lambda x: x[m], params), p, rtol=1e-9, atol=1e-10, what=f"member {m}")
    logits = ensemble.apply(lambda p, x: model.apply(p, x)["logits"], params, batches[0])
    torch.testing.assert_close(logits[1], model.apply(ensemble.unstack(params)[1], batches[0])["logits"])


# ----------------------------------------------------------------------------- LoRA and interop


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_lora_on_device(shape):
    """LoRA adapters moved to the device: identity at B = 0, factored == merged (values and
    adapter gradients), == the CPU, unmerge restores the weights; adapter-only bf16 training
    learns and leaves the base params untouched."""
    model, params = model_and_params(shape)
    ids = dev(torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0)))
    spec, ad = lora.init(params, targets=["*.attn.qkv", "*.attn.out", "*.mlp.*"], rank=3, alpha=6)
    ad = dev(ad)
    base = model.apply(params, ids, labels=ids)
    assert torch.equal(spec.apply(model.apply, params, ad, ids, labels=ids)["logits"], base["logits"])
    g = torch.Generator().manual_seed(1)
    ad = tree.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g).to(t.device), ad)
    fact = spec.apply(model.apply, params, ad, ids, labels=ids)
    merged = spec.merged(params, ad)
    assert on_device(merged)
    torch.testing.assert_close(fact["logits"], model.apply(merged, ids, labels=ids)["logits"], rtol=1e-4, atol=1e-5)
    assert float((fact["logits"] - base["logits"]).abs().max()) > 1e-3
    on_cpu = spec.apply(model.apply, cpu(params), cpu(ad), ids.cpu(), labels=ids.cpu())
    torch.testing.assert_close(fact["logits"].cpu(), on_cpu["logits"], rtol=1e-4, atol=1e-5)
    g_f = grad(lambda a: spec.apply(model.apply, params, a, ids, labels=ids)["loss"])(ad)
    g_m = grad(lambda a: model.apply(spec.merged(params, a), ids, labels=ids)["loss"])(ad)
    close_trees(g_f, g_m, rtol=1e-4, atol=1e-6, what="adapter grads")
    close_trees(spec.unmerge(merged, ad), params, rtol=1e-5, atol=1e-6, what="unmerge")

    spec2, ad2, wrap = lora.from_cli_args(params, rank=4, alpha=8, targets="*.attn.qkv,*.mlp.*", seed=0)
    ad2 = dev(ad2)
    step = make_train_step(wrap(make_lm_loss(model)), adamw_opt(ad2, lr=1e-2), precision="bf16")
    state = step.init(ad2)
    frozen = tree.map(torch.clone, params)
    batch = {"input_ids": ids}
    losses = []
    for _ in range(10):
        ad2, state, metrics = step(ad2, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses), losses
    assert equal_trees(params, frozen) and on_device(ad2)
    assert all(x.dtype == torch.float32 for x in tree.leaves(ad2))


def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=None, eos_token_id=None)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so the import is really checked
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_interop_on_device(kind):
    """A transformers model on the device: imported params stay on it; logits, loss and gradients
    equal transformers' on the device; the export (a CPU model) reproduces our logits."""
    from aam_func.interop.hf import from_transformers, to_transformers

    hf = _hf_model(kind).to(DEVICE)
    cfg, params = from_transformers(hf)
    assert on_device(params)
    model = af.Transformer(cfg)
    ids = dev(torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0)))
    ours = model.apply(params, ids, labels=ids)
    theirs = hf(ids, labels=ids)
    torch.testing.assert_close(ours["logits"], theirs.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["loss"], theirs.loss, rtol=1e-5, atol=1e-5)
    g = grad(lambda p: model.apply(p, ids, labels=ids)["loss"])(params)
    hf.zero_grad()
    theirs.loss.backward()
    as_model = type(hf)(hf.config).to(DEVICE)
    with torch.no_grad():  # their gradients in our names: a "model" holding them, imported
        hf_grads = dict(hf.named_parameters())
        for name, p in as_model.named_parameters():
            p.copy_(hf_grads[name].grad)
    _, g_ref = from_transformers(as_model)
    close_trees(g, g_ref, rtol=1e-3, atol=1e-6, what=f"{kind} grads")
    back = to_transformers(cfg, params).eval()
    with torch.no_grad():
        exported = back.to(DEVICE)(ids).logits
    torch.testing.assert_close(exported, ours["logits"].detach(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_and_resume_on_device(tmp_path):
    """Device params and a mixed-device optimizer state saved and loaded bit for bit (onto the
    CPU, then moved back); tree.load straight onto the device; 2 + save/load + 2 steps with
    dropout from device generators equal 4 steps straight."""
    cfg = af.ModelConfig(**{**GPT, "dropout": 0.1, "max_seq_len": 16})
    model = af.Transformer(cfg)
    params0 = dev(model.init(seed=0))
    blocks = dev(torch.randint(0, 97, (40, 16), generator=torch.Generator().manual_seed(0)))
    loader = BlockLoader(blocks, 4, seed=3)

    def run(params, state, start, stop, step):
        for s in range(start, stop):
            params, state, _ = step(params, state, loader.batch(s), device_generator(1000 + s))
        return params, state

    step = make_train_step(make_lm_loss(model), adamw_opt(params0))
    straight = run(params0, step.init(params0), 0, 4, step)
    half = run(params0, step.init(params0), 0, 2, step)
    assert on_device(half[0])
    save_checkpoint(tmp_path / "ck", cfg=cfg, params=half[0], opt_state=half[1], step=2)
    fresh = make_train_step(make_lm_loss(model), adamw_opt(params0))
    ck = load_checkpoint(tmp_path / "ck", opt_template=fresh.init(params0))
    assert ck.step == 2
    assert equal_trees(ck.params, half[0]) and equal_trees(ck.opt_state, half[1])
    resumed = run(dev(ck.params), dev(ck.opt_state), 2, 4, fresh)
    close_trees(resumed[0], straight[0], rtol=1e-5, atol=1e-6, what="resumed params")
    close_trees(resumed[1], straight[1], rtol=1e-5, atol=1e-6, what="resumed optimizer state")
    tree.save(half[0], tmp_path / "p.safetensors")
    back = tree.load(tmp_path / "p.safetensors", like=half[0], device=DEVICE)
    assert on_device(back) and equal_trees(back, half[0]) and tree.names(back) == tree.names(half[0])


# ----------------------------------------------------------------------------- command line

CLI_TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size", "4",
            "--vocab-size", "300", "--device", DEVICE]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_generate_eval_on_device(tmp_path, corpus):
    """python -m aam_func train/generate/eval --device cuda, as separate processes."""
    out = tmp_path / "run"
    r = run_python(["-m", "aam_func", "train", "--data", str(corpus), "--steps", "3", "--eval-every", "2",
                    "--output-dir", str(out), "--sample-tokens", "8", "--precision", "fp32", *CLI_TINY])
    assert_ok(r)
    assert "held-out loss" in r.stdout and "sample:" in r.stdout and "step 2: val loss" in r.stdout
    assert "precision fp32" in r.stdout
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and math.isfinite(state["metrics"]["val_loss"])
    gen = ["-m", "aam_func", "generate", "--checkpoint", str(out), "--prompt", "The with", "--prompt", "x",
           "--max-new-tokens", "5", "--seed", "1", "--device", DEVICE]
    r = run_python(gen)
    assert_ok(r)
    assert r.stdout.count("--- ") == 2 and "The with" in r.stdout
    assert run_python(gen).stdout == r.stdout  # seeded on the device
    r = run_python(["-m", "aam_func", "eval", "--checkpoint", str(out / "checkpoint"), "--device", DEVICE])
    assert_ok(r)
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("loss", "perplexity")))
    assert abs(float(lines["loss"]) - state["metrics"]["val_loss"]) < 1e-4


def test_cli_bf16_with_dropout_and_checkpointing_on_device(tmp_path, corpus, capsys):
    from aam_func import cli
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    code = cli.main(["train", "--data", str(corpus), "--steps", "3", "--eval-every", "0", "--sample-tokens", "0",
                     "--output-dir", str(out), "--precision", "bf16", "--dropout", "0.1", "--gradient-checkpointing",
                     *CLI_TINY])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "precision bf16" in stdout and ("auto attention" in stdout) == ON_CUDA
    rec = _metrics(out)
    assert all(math.isfinite(v) for r_ in rec for k, v in r_.items() if isinstance(v, float))
    saved = load_file(out / "checkpoint" / "params.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())


@cuda_only
def test_cli_fp16_stop_and_resume_on_device(tmp_path, corpus, capsys):
    """--precision fp16 (loss scaling) split by --stop-after and continued by --resume: the loss
    scale travels through the checkpoint onto the device."""
    from aam_func import cli
    from safetensors.torch import load_file

    out = tmp_path / "fp16"
    common = ["train", "--data", str(corpus), "--steps", "4", "--eval-every", "0", "--sample-tokens", "0",
              "--output-dir", str(out), "--precision", "fp16", *CLI_TINY]
    assert cli.main([*common, "--stop-after", "2"]) == 0
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert cli.main([*common, "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "precision fp16" in stdout
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    opt = load_file(out / "checkpoint" / "optimizer.safetensors")
    scale = [v for k, v in opt.items() if k.endswith("loss_scale")]
    assert scale and math.isfinite(float(scale[0])) and float(scale[0]) > 0
    assert all(math.isfinite(r_["loss"]) for r_ in _metrics(out) if "loss" in r_)


def test_library_run_on_device_split_and_resumed_equals_straight(tmp_path, corpus):
    """aam_func.run (what the CLI calls) with the device in the RunConfig: a 4-step run with
    dropout split by stop_after and resumed ends where the straight run does, its params on the
    device; the log callable hears the device's precision."""
    import dataclasses

    from aam_func import run

    lines = []
    cfg = run.RunConfig(data=str(corpus), steps=4, eval_every=0, sample_tokens=0, precision="fp32", dropout=0.1,
                        d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=4, vocab_size=300, device=DEVICE,
                        output_dir=str(tmp_path / "straight"))
    straight = run.train(cfg, log=lines.append)
    assert straight.step == 4 and on_device(straight.params) and any("precision fp32" in s for s in lines)
    split = dataclasses.replace(cfg, output_dir=str(tmp_path / "split"), stop_after=2)
    assert run.train(split, log=lines.append).step == 2
    resumed = run.train(dataclasses.replace(split, stop_after=None, resume=""), log=lines.append)
    assert resumed.step == 4 and math.isfinite(resumed.metrics["val_loss"])
    close_trees(resumed.params, straight.params, rtol=1e-5, atol=1e-6, what="resumed run")


# ----------------------------------------------------------------------------- data parallel (subprocess)

DIST_SCRIPT = r"""
import datetime
import os
import traceback
import torch
import torch.distributed as dist
import aam_func as af
from aam_func import distributed, optim, tree
from aam_func.train import evaluate, make_lm_loss, make_eval_step, make_train_step

DEVICE = os.environ["AAM_CUDA_TEST_DEVICE"]
dev = torch.device("cuda", 0) if DEVICE == "cuda" else torch.device(DEVICE)
backend = "nccl" if dev.type == "cuda" else "gloo"
assert distributed.init_from_env(dev) is None  # WORLD_SIZE=1: no process group, as documented
if dev.type == "cuda":
    torch.cuda.set_device(dev)
dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                        **({"device_id": dev} if backend == "nccl" else {}))
ctx = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=dev, backend=backend, timeout_s=60.0,
                              bucket_bytes=4096)  # small buckets: several all_reduces per call
cfg = af.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0)
model = af.Transformer(cfg)
params = tree.to(model.init(seed=0), dev)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 97, (4, 12), generator=g).to(dev)
mask = torch.ones(4, 12, dtype=torch.long, device=dev)
mask[1, 7:] = 0
failed = []


def case(name, fn):
    try:
        fn()
        print("ok  ", name, flush=True)
    except Exception:
        failed.append(name)
        print("FAIL", name, flush=True)
        traceback.print_exc()


def collectives():
    got = ctx.broadcast_tree(params)
    assert all(torch.equal(a, b) and a.device == b.device for a, b in zip(tree.leaves(got), tree.leaves(params)))
    assert ctx.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    ctx.barrier()
    xs = [torch.randn(5, device=dev), torch.randn(3, 4, device=dev)]
    assert all(torch.equal(a, b) for a, b in zip(ctx.all_sum(xs), xs))


def reduced_step_equals_plain(batch):
    def run():
        opt = optim.chain(optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2))
        plain = make_train_step(make_lm_loss(model), opt)
        reduced = make_train_step(make_lm_loss(model), opt, grad_reduce=ctx.grad_reduce)
        p1, _, m1 = plain(params, plain.init(params), batch)
        p2, _, m2 = reduced(params, reduced.init(params), batch)
        for a, b in zip(tree.leaves(p2), tree.leaves(p1)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert abs(float(m2["loss"]) - float(m1["loss"])) <= 1e-5 * abs(float(m1["loss"]))
        assert int(m2["tokens"]) == int(m1["tokens"])
    return run


def evaluation():
    ev = make_eval_step(make_lm_loss(model, train=False))
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    a, b = ctx.evaluate(ev, params, batches), evaluate(ev, params, batches)
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)


try:
    case("broadcasts, barrier, all_sum", collectives)
    case("grad_reduce step, batch with attention_mask",
         reduced_step_equals_plain({"input_ids": ids, "labels": ids, "attention_mask": mask}))
    case("grad_reduce step, batch without attention_mask (what the CLI's BlockLoader gives)",
         reduced_step_equals_plain({"input_ids": ids, "labels": ids}))
    case("evaluate over the group", evaluation)
finally:
    ctx.close()
print("FAILED: " + "; ".join(failed) if failed else "OK", flush=True)
raise SystemExit(1 if failed else 0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_group_collectives_and_grad_reduce():
    """aam_func.distributed over a one-process nccl group (gloo in the CPU dry run) on the device:
    broadcasts, barrier, bucketed all_reduce, and a train step whose gradients go through
    grad_reduce equal the plain step, for batches with and without an attention mask."""
    r = run_python(["-c", DIST_SCRIPT], timeout=180, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(),
                   RANK=0, WORLD_SIZE=1, LOCAL_RANK=0)
    assert_ok(r)
    assert r.stdout.rstrip().endswith("OK")
