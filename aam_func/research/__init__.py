"""Curvature, data attribution and uncertainty on any model ``apply(params, inputs)``.

- :mod:`.problem`: the model/likelihood split (:class:`Problem`) and the closed-form output pieces;
- :mod:`.curvature`: Hessian, GGN and Fisher vector products (summed or per example, chunked);
- :mod:`.spectral`: Hutchinson trace/diagonal, Lanczos, conjugate gradients on any product;
- :mod:`.diag`: the exact (per-example) diagonal GGN;
- :mod:`.kfac`: KFAC / EK-FAC factors of every linear-like use (via ``aam_func.intercept``);
  :mod:`.precondition`: the KFAC-preconditioned optimizer transformation;
- :mod:`.influence`: influence scores with CG / LiSSA / EK-FAC inverse products; :mod:`.trak`:
  TRAK-style projected gradients through the ghost factors;
- :mod:`.laplace`: last-layer, diagonal and KFAC Laplace, marginal likelihood, GLM predictive.

Guide: ``docs/research.md``; derivations: ``proofs/curvature.md``.
"""

from . import curvature, diag, influence, kfac, laplace, problem, spectral, trak
from .curvature import FISHER_KINDS, fisher_vp, ggn_vp, hessian_vp
from .diag import diag_ggn
from .precondition import kfac_preconditioned
from .problem import Problem
from .spectral import cg, hutchinson_diag, hutchinson_trace, lanczos

__all__ = ["Problem", "hessian_vp", "ggn_vp", "fisher_vp", "FISHER_KINDS", "hutchinson_trace", "hutchinson_diag",
           "lanczos", "cg", "diag_ggn", "kfac", "kfac_preconditioned", "influence", "trak", "curvature", "spectral",
           "problem", "diag", "laplace"]
