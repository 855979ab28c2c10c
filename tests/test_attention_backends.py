"""Which path ``attention()`` takes, pinned for every case its backend choice distinguishes.

The table below was recorded from the single ``attention()`` function that chose the path before
the choice moved to ``aam_func/ops/attention/backends.py``, and it must not change: the same
input runs on the same kernel. The path is observed from outside, by what the call runs first:

    s  F.scaled_dot_product_attention            b  BlockwiseAttention.apply
    d  torch.baddbmm (the additive-bias form)    m  torch.softmax (the dense math path)
    w  math, with the "no attention dropout" warning (blockwise asked, dropout given)
    x  ImportError naming xformers (its path, on a machine without xformers)
    V  ValueError before anything runs (a backend refuses the call)

Axes: the backend asked; ``q_offset`` (a static cache, given as 0); one extra (none, an ALiBi
relative bias, dropout, v in another dtype); the transform / precision state (columns); the
mask (one letter per mask, in MASKS order). The CUDA-only row (vmap on CUDA avoids SDPA) cannot
run here: ``test_table_cuda_vmap_row`` checks it on the table itself.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vmap

from aam_func.ops import attention as A
from aam_func.ops.attention import RelativeBias, Sparsity, attention, backends

H, D = 2, 4
# name -> (q_len, k_len, keyword arguments)
MASKS = {
    "full": (4, 4, {}),
    "full_short": (2, 5, {}),
    "causal": (4, 4, {"causal": True}),
    "causal_short": (2, 5, {"causal": True}),
    "causal_one": (1, 5, {"causal": True}),
    "padding": (4, 4, {"causal": True, "key_padding_mask": torch.tensor([[True, False, True, True]])}),
    "window": (4, 4, {"causal": True, "window": 2}),
    "sparsity": (4, 4, {"causal": True, "sparsity": Sparsity("strided", stride=2)}),
}
EXTRAS = {
    "plain": {},
    "rel": {"relative_bias": RelativeBias("alibi", torch.tensor([0.5, 0.25]))},
    "dropout": {"dropout_p": 0.1},
    "mixed": {},  # v in float64, q and k in float32
}
STATES = ("grad", "nograd", "jvp", "vmap", "bf16grad", "bf16nograd", "bf16const", "compiling", "compile_jvp")
BACKENDS = ("auto", "math", "sdpa", "blockwise", "xformers")

# backend   q_offset extra  | one column per state (STATES order), one letter per mask (MASKS order)
ROUTES = """
auto      -      plain   | sssbsbbb sssbsbbb bbbbbbbb sssbsbbb dddddmdd sssbsbbb sssbsbbb sssbsbbb sssbsbbb
auto      -      rel     | bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb mmmmmmmm bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb
auto      -      dropout | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
auto      -      mixed   | bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb dddddmdd bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb
auto      offset plain   | ssssssss ssssssss mmmmmmmm ssssssss mmmmmmmm ssssssss ssssssss mmmmmmmm mmmmmmmm
auto      offset rel     | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
auto      offset dropout | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
auto      offset mixed   | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      -      plain   | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      -      rel     | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      -      dropout | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      -      mixed   | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      offset plain   | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      offset rel     | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      offset dropout | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
math      offset mixed   | mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm mmmmmmmm
sdpa      -      plain   | ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss
sdpa      -      rel     | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
sdpa      -      dropout | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
sdpa      -      mixed   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
sdpa      offset plain   | ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss ssssssss
sdpa      offset rel     | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
sdpa      offset dropout | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
sdpa      offset mixed   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
blockwise -      plain   | bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb
blockwise -      rel     | bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb
blockwise -      dropout | wwwwwwww wwwwwwww wwwwwwww wwwwwwww wwwwwwww wwwwwwww wwwwwwww wwwwwwww wwwwwwww
blockwise -      mixed   | bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb bbbbbbbb
blockwise offset plain   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
blockwise offset rel     | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
blockwise offset dropout | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
blockwise offset mixed   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  -      plain   | xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx
xformers  -      rel     | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  -      dropout | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  -      mixed   | xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx xxxxxxxx
xformers  offset plain   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  offset rel     | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  offset dropout | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
xformers  offset mixed   | VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV VVVVVVVV
"""


@contextlib.contextmanager
def _observe(monkeypatch):
    """Record the first of the paths' entry points that a call reaches."""
    seen = []

    def spy(letter, real):
        def wrapper(*a, **k):
            seen.append(letter)
            return real(*a, **k)
        return wrapper

    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", spy("s", F.scaled_dot_product_attention))
        m.setattr(torch, "baddbmm", spy("d", torch.baddbmm))
        m.setattr(torch, "softmax", spy("m", torch.softmax))
        m.setattr(A.BlockwiseAttention, "apply", staticmethod(spy("b", A.BlockwiseAttention.apply)))
        yield seen


def _inputs(mask, extra):
    Tq, Tk, kw = MASKS[mask]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g) for T in (Tq, Tk, Tk))
    if extra == "mixed":
        v = v.double()
    return q, k, v, {**kw, **EXTRAS[extra]}


def _run_in_state(state, call, q, k, v):
    """Run ``call(q, k, v)`` in one transform / precision state."""
    if state.startswith("bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if state == "bf16nograd":
                with torch.no_grad():
                    return call(q, k, v)
            grad = state == "bf16grad"
            return call(*(x.requires_grad_(grad) for x in (q, k, v)))
    if state == "nograd":
        with torch.no_grad():
            return call(q, k, v)
    if state in ("jvp", "compile_jvp"):
        return jvp(lambda q_: call(q_, k, v), (q,), (torch.ones_like(q),))
    if state == "vmap":
        return vmap(call)(*(torch.stack([x, x]) for x in (q, k, v)))
    return call(*(x.requires_grad_() for x in (q, k, v)))  # grad, compiling


def route(monkeypatch, backend, q_offset, extra, state, mask) -> str:
    """The letter of the path ``attention`` takes for one case (see the module docstring)."""
    q, k, v, kw = _inputs(mask, extra)
    call = lambda q, k, v: attention(q, k, v, backend=backend, q_offset=q_offset, **kw)  # noqa: E731
    with contextlib.ExitStack() as stack:
        if state.startswith("compil"):
            stack.enter_context(monkeypatch.context()).setattr(torch.compiler, "is_compiling", lambda: True)
        seen = stack.enter_context(_observe(monkeypatch))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        error = None
        try:
            _run_in_state(state, call, q, k, v)
        except Exception as e:  # noqa: BLE001 - a later failure does not change the path taken
            error = e
    if seen:
        warned = any("no attention dropout" in str(w.message) for w in caught)
        return "w" if seen[0] == "m" and warned else seen[0]
    if isinstance(error, ImportError) and "xformers" in str(error):
        return "x"
    if isinstance(error, ValueError):
        return "V"
    raise AssertionError(f"no path observed and no refusal: {error!r}")


def _rows():
    for backend in BACKENDS:
        for q_offset in (None, 0):
            for extra in EXTRAS:
                yield backend, q_offset, extra


def _key(backend, q_offset, extra):
    return f"{backend:<10}{'-' if q_offset is None else 'offset':<7}{extra:<8}"


def render(monkeypatch) -> str:
    """The whole table as observed now (to record it: see ``python tests/test_attention_backends.py``)."""
    lines = []
    for row in _rows():
        cols = ["".join(route(monkeypatch, *row, state, mask) for mask in MASKS) for state in STATES]
        lines.append(_key(*row) + "| " + " ".join(cols))
    return "\n".join(lines)


def _expected():
    table = {}
    for line in ROUTES.strip().splitlines():
        key, cols = line.split("|")
        table[key.strip()] = dict(zip(STATES, cols.split()))
    return table


@pytest.mark.parametrize("backend, q_offset, extra", list(_rows()))
def test_attention_takes_the_pinned_path(monkeypatch, backend, q_offset, extra):
    want = _expected()[_key(backend, q_offset, extra).strip()]
    got = {state: "".join(route(monkeypatch, backend, q_offset, extra, state, m) for m in MASKS) for state in STATES}
    assert got == want


def _facts(**changes):
    base = dict(backend="auto", device="cpu", same_dtype=True, cpu_bf16_grad=False, compiling=False, forward_ad=False,
                vmap=False, q_offset=False, relative_bias=False, dropout=False, padding=False, window=False,
                sparsity=False, causal=True, q_len=4, k_len=4)
    return backends.CallFacts(**{**base, **changes})


def test_table_cuda_vmap_row():
    """Under vmap on CUDA, SDPA's memory-efficient backward fails, so auto takes the blockwise
    kernel there; on the CPU it keeps SDPA. (The CUDA half cannot run on this machine.)"""
    assert backends.choose_path(_facts(device="cuda", vmap=True)).path == "blockwise"
    assert backends.choose_path(_facts(device="cuda")).path == "sdpa"
    assert backends.choose_path(_facts(device="cpu", vmap=True)).path == "sdpa"
    assert backends.choose_path(_facts(device="cuda", vmap=True, backend="sdpa")).path == "sdpa"  # asked for


def test_call_facts_skips_the_transform_checks_while_compiling(monkeypatch):
    """Dynamo cannot trace the transform-stack reads, so a compiled call reports neither."""
    q = torch.randn(1, H, 4, D)
    kw = dict(backend="auto", causal=True, key_padding_mask=None, window=None, sparsity=None, relative_bias=None,
              dropout_p=0.0, q_offset=None)
    inside = []
    jvp(lambda q_: inside.append(backends.call_facts(q_, q_, q_, **kw)) or q_, (q,), (q,))
    vmap(lambda q_: inside.append(backends.call_facts(q_, q_, q_, **kw)) or q_)(q[None])
    assert inside[0].forward_ad and inside[1].vmap
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    jvp(lambda q_: inside.append(backends.call_facts(q_, q_, q_, **kw)) or q_, (q,), (q,))
    assert inside[2].compiling and not inside[2].forward_ad and not inside[2].vmap


def test_backend_names_have_one_owner():
    assert A.BACKENDS is backends.BACKENDS
    assert set(backends.BACKENDS) - {"auto"} <= set(backends.PATHS)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(*(torch.randn(1, H, 4, D) for _ in range(3)), backend="flash3")


if __name__ == "__main__":
    print(render(pytest.MonkeyPatch()))
