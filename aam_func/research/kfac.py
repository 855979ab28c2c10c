"""KFAC and EK-FAC factors for every linear-like use of a weight, found by
:class:`aam_func.intercept.Intercept` (``F.linear``, ``torch.addmm``, ``F.conv1d/2d`` with
groups 1): attention projections, MLPs, the LM head, LoRA's merged weights; no hooks, no
module surgery, any model ``apply(params, inputs)``.

    factors = collect(problem, params, inputs, targets, fisher="type-2")
    factors = eigen_correct(problem, params, inputs, targets, factors)      # EK-FAC
    pre = inverse_product(factors, grads, damping=1e-3)                     # (F + λI)⁻¹ g per factored weight

For a weight read as the matrix W (out, in) its uses multiply (a conv's (out, C·∏k), an addmm's
transpose), with inputs a (rows: examples × positions × uses, "KFAC-expand"; Eschenhagen et al.
2023) and the output gradients g backpropagated from the problem's output vectors:

    A = (1 / (N·T)) Σ a aᵀ        G = c Σ g gᵀ        F_W ≈ A ⊗ G  (on W row-major: G W A)

N examples, T rows per example at the use, c the problem's scale; g from the columns of the
output Hessian's square root (``"type-2"``: exact for one example and one use), from labels
drawn from the model (``"mc"``, averaged over ``samples``), or from the true labels
(``"empirical"``). This is curvlinops's convention (``KFACLinearOperator``), checked against
it in ``tests/test_research_kfac.py``. ``bias="separate"``: a bias gets the block G alone (its
input is 1); ``"augment"``: a column of ones joins a, and [W | b] is one matrix (kronfluence's
form). EK-FAC (George et al. 2018) keeps the eigenbases Q_A, Q_G and replaces the eigenvalue
products by c Σ_n ((Q_Gᵀ G_n Q_A)²) over per-example (and per-vector) gradients G_n.
A weight also used otherwise (a lookup, ``W.t()``, a tied embedding) is left out: ``skipped``.
Derivations: ``proofs/curvature.md`` §4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_number
from ..intercept import Client, Intercept, Use
from ..per_sample.batching import batch_size, check_chunk, chunks, slice_batch
from ..per_sample.factors import matrix_shape, patches
from ..per_sample.paths import named_leaves
from .problem import Problem

__all__ = ["Factor", "Factors", "collect", "eigen_correct", "inverse_product", "KFAC_FISHERS", "BIAS_MODES"]

KFAC_FISHERS = ("type-2", "mc", "empirical")
BIAS_MODES = ("separate", "augment")


@dataclass(frozen=True)
class Factor:
    """One weight's factors. ``A`` (in', in'), ``G`` (out, out) with in' = in (+1 with an
    augmented bias); ``bias``: the bias's dotted name or None; ``transposed``: the weight is
    stored (in, out) (``torch.addmm``); ``eig``: (Q_A, Q_G, Λ (out, in')) once eigen-corrected."""

    name: str
    shape: tuple
    A: Tensor
    G: Tensor
    bias: Optional[str] = None
    augmented: bool = False
    transposed: bool = False
    eig: Optional[tuple] = None


@dataclass(frozen=True)
class Factors:
    """``factors`` by weight name, and the weights ``skipped`` (used otherwise) with why."""

    factors: dict
    skipped: dict
    fisher: str
    bias: str


class _Collector(Client):
    """Records each recognised linear-like use's input and adds a zero probe (requiring grad)
    to its output, whose gradient is the use's output gradient; other uses mark the weight."""

    def __init__(self):
        self.uses: list = []  # (key, kind, x, probe, bias tensor, options, kernel)
        self.others: dict = {}

    def linear(self, use: Use) -> Tensor:
        out = use.run()
        if not use.plain:
            self.others[use.key] = f"a {use.kind} use with groups > 1"
            return out
        # a stride-0 zero leaf: no (out-sized) allocation or fill; its gradient is the output's
        probe = torch.zeros((), dtype=out.dtype, device=out.device).expand(out.shape).requires_grad_()
        self.uses.append((use.key, use.kind, use.input.detach(), probe, use.bias, use.options,
                          tuple(use.weight.shape[2:])))
        return out + probe

    conv = linear

    def embedding(self, use: Use) -> Tensor:
        self.others[use.key] = "a lookup (F.embedding)"
        return use.run()

    def other(self, key, tensor):
        self.others.setdefault(key, "another use (not F.linear / addmm / conv)")
        return tensor


def _input_rows(kind: str, x: Tensor, options: dict, kernel: tuple) -> tuple[Tensor, int]:
    """(a (rows, in), T rows per example) of one use in (out, in) orientation."""
    B = x.shape[0]
    if kind == "conv":
        nd = len(kernel)
        U = patches(x.reshape(-1, *x.shape[-(nd + 1):]), kernel, options)  # (B, C·∏k, L)
        return U.transpose(1, 2).reshape(-1, U.shape[1]), U.shape[2]
    a = x.reshape(-1, x.shape[-1])
    return a, a.shape[0] // B


def _grad_rows(kind: str, g: Tensor) -> Tensor:
    """g (rows, out) of one use's output gradient, rows as :func:`_input_rows` orders them."""
    if kind == "conv":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def _vectors(problem: Problem, out: Tensor, y: Tensor, fisher: str, samples: int, generator):
    """The output vectors to backpropagate, each with its weight: sqrt columns (1), drawn-label
    gradients (1/samples) or the true-label gradient (1); all unscaled."""
    if fisher == "type-2":
        return [(s, 1.0) for s in problem.output_sqrt(out, y, 1.0)]
    if fisher == "empirical":
        return [(problem.output_grads(out, y), 1.0)]
    m = problem.mask(y, out).unsqueeze(-1)
    drawn = problem.sample_targets(out, generator, samples)
    return [(m * problem.output_grads(out, d), 1.0 / samples) for d in drawn]


def _bias_names(params) -> dict:
    flat, _ = named_leaves(params)
    return {id(v): n for n, v in flat.items()}


def _pass(problem, params, x, y, fisher, samples, generator, watched):
    """One chunk: its recorded uses and, per backpropagated vector, the probes' gradients."""
    rec = _Collector()
    with torch.enable_grad(), Intercept(watched, rec):
        out = problem.apply(params, x)
    problem.check(out, y)
    vecs = _vectors(problem, out.detach(), y, fisher, samples, generator)
    probes = [u[3] for u in rec.uses]
    grads = []
    for i, (v, w) in enumerate(vecs):
        gs = torch.autograd.grad(out, probes, v, retain_graph=i < len(vecs) - 1, allow_unused=True)
        grads.append(([torch.zeros_like(p) if g is None else g for g, p in zip(gs, probes)], w))
    return rec, grads


def _candidates(params) -> dict:
    flat, _ = named_leaves(params)
    return {n: v for n, v in flat.items() if isinstance(v, Tensor) and 2 <= v.dim() <= 4 and v.is_floating_point()}


def collect(problem: Problem, params, inputs, targets, *, fisher: str = "type-2", samples: int = 1,
            generator: Optional[torch.Generator] = None, bias: str = "separate",
            chunk_size: Optional[int] = None) -> Factors:
    """KFAC factors of every linear-like weight over the batch; see the module doc."""
    check_choice("fisher", fisher, KFAC_FISHERS)
    check_choice("bias", bias, BIAS_MODES)
    check_int("samples", samples, min=1)
    B = batch_size(inputs)
    c = problem.scale(targets)
    watched, ids = _candidates(params), _bias_names(params)
    sums: dict = {}  # name -> [A sum, G sum, rows, info]
    skipped: dict = {}
    for s, e in chunks(B, check_chunk(chunk_size, B)):
        rec, grads = _pass(problem, params, slice_batch(inputs, s, e), targets[s:e], fisher, samples, generator, watched)
        skipped.update(rec.others)
        for k, (key, kind, x, probe, b, options, kernel) in enumerate(rec.uses):
            bname = ids.get(id(b)) if b is not None else None
            a, T = _input_rows(kind, x, options, kernel)
            if bias == "augment" and bname is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
            A = torch.mm(a.t(), a)
            if T != 1:
                A.div_(T)
            G = None
            for gs, w in grads:
                gg = _grad_rows(kind, gs[k])
                if G is None:
                    G = torch.mm(gg.t(), gg)
                    if w != 1:
                        G.mul_(w)
                else:
                    G.addmm_(gg.t(), gg, alpha=w)
            entry = sums.get(key)
            if entry is None:  # the first use of this weight: its sums start as these fresh tensors
                sums[key] = [A, G, e - s, (bname, kind == "addmm")]
            else:
                entry[0].add_(A)
                entry[1].add_(G)
                entry[2] += (e - s)
    factors = {}
    for key, (A, G, n, (bname, transposed)) in sums.items():
        if key in skipped:
            continue
        factors[key] = Factor(key, tuple(watched[key].shape), A.div_(n), G.mul_(c), bname,
                              bias == "augment" and bname is not None, transposed)
    return Factors(factors, {k: v for k, v in skipped.items() if k in watched}, fisher, bias)


def _matrix(f: Factor, weight_grad: Tensor, bias_grad: Optional[Tensor]) -> Tensor:
    """The weight's (and an augmented bias's) gradient as the (out, in') matrix of the factors."""
    W = weight_grad.t() if f.transposed else weight_grad.reshape(matrix_shape(f.shape))
    if f.augmented:
        W = torch.cat([W, bias_grad.reshape(-1, 1)], 1)
    return W


def _unmatrix(f: Factor, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    b = None
    if f.augmented:
        M, b = M[:, :-1], M[:, -1]
    W = M.t() if f.transposed else M.reshape(f.shape)
    return W, b


def eigen_correct(problem: Problem, params, inputs, targets, factors: Factors, *, samples: int = 1,
                  generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None) -> Factors:
    """EK-FAC: each factor's eigenbases and the corrected eigenvalues c Σ_n,v (Q_Gᵀ G_n,v Q_A)²
    from per-example gradients of the weight, projected use by use (never formed whole)."""
    B = batch_size(inputs)
    c = problem.scale(targets)
    eig = {k: (torch.linalg.eigh(f.A)[1], torch.linalg.eigh(f.G)[1]) for k, f in factors.factors.items()}
    lam = {k: 0 for k in eig}
    watched = _candidates(params)
    for s, e in chunks(B, check_chunk(chunk_size, B)):
        rec, grads = _pass(problem, params, slice_batch(inputs, s, e), targets[s:e], factors.fisher, samples,
                           generator, watched)
        for gs, w in grads:
            per = {}  # name -> (b, out, in') per-example gradient in the eigenbasis
            for k, (key, kind, x, probe, b, options, kernel) in enumerate(rec.uses):
                if key not in eig:
                    continue
                f, (QA, QG) = factors.factors[key], eig[key]
                (a, _), g = _input_rows(kind, x, options, kernel), _grad_rows(kind, gs[k])
                if f.augmented:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                n = e - s
                ga = (g @ QG).reshape(n, -1, g.shape[1]).transpose(1, 2) @ (a @ QA).reshape(n, -1, a.shape[1])
                per[key] = per.get(key, 0) + ga
            for key, ga in per.items():
                lam[key] = lam[key] + w * ga.pow(2).sum(0)
    out = {k: replace(f, eig=(eig[k][0], eig[k][1], c * lam[k])) for k, f in factors.factors.items()}
    return replace(factors, factors=out)


def inverse_product(factors: Factors, grads: dict, *, damping: float) -> dict:
    """{name: (F + λI)⁻¹ g} for each factored weight (and its bias) of a flat ``{name: grad}``
    dict: Q_G [(Q_Gᵀ W Q_A) / (Λ + λ)] Q_Aᵀ with Λ = λ_G λ_Aᵀ (KFAC, exact eigendecompositions of
    A and G) or EK-FAC's corrected eigenvalues; a separate bias by (G + λI)⁻¹. Names without a
    factor are left out (the caller decides what they get)."""
    check_number("damping", damping, min=0, min_open=True)
    out = {}
    for key, f in factors.factors.items():
        if key not in grads:
            raise ValueError(f"grads: no gradient for the factored weight {key!r}")
        bias_g = grads.get(f.bias) if f.bias else None
        M = _matrix(f, grads[key], bias_g)
        if f.eig is not None:
            QA, QG, lam = f.eig
        else:
            (la, QA), (lg, QG) = torch.linalg.eigh(f.A), torch.linalg.eigh(f.G)
            lam = lg[:, None] * la[None, :]
        P = QG @ ((QG.t() @ M @ QA) / (lam + damping)) @ QA.t()
        W, b = _unmatrix(f, P)
        out[key] = W
        if f.bias and not f.augmented and bias_g is not None:
            lg, QG2 = torch.linalg.eigh(f.G)
            out[f.bias] = QG2 @ ((QG2.t() @ bias_g.reshape(-1)) / (lg + damping))
        elif f.bias:
            out[f.bias] = b
    return out
