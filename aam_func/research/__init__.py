"""Curvature, data attribution and uncertainty on any model (placeholder; filled below)."""

from . import kfac
from .precondition import kfac_preconditioned
from .curvature import FISHER_KINDS, fisher_vp, ggn_vp, hessian_vp
from .diag import diag_ggn
from .problem import Problem
from .spectral import cg, hutchinson_diag, hutchinson_trace, lanczos

__all__ = ["Problem", "hessian_vp", "ggn_vp", "fisher_vp", "FISHER_KINDS", "hutchinson_trace", "hutchinson_diag",
           "lanczos", "cg"]
