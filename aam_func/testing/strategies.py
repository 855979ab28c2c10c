"""Hypothesis strategies for aam_func: small valid configs, params, token batches, pytrees,
tensors and op inputs. Needs hypothesis: ``pip install aam-func[testing]``.

    from hypothesis import given
    from aam_func.testing import strategies as afs

    @given(afs.model_configs(attention_types=["local"]), afs.seeds())
    def test_something(cfg, seed): ...

Every strategy produces only valid values (a ModelConfig that builds, ids inside the vocabulary,
at least one real token per row, finite floats) and shrinks toward the smallest ones.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "aam_func.testing.strategies needs hypothesis, an optional dependency: "
        "pip install 'aam-func[testing]' (or pip install hypothesis)"
    ) from e

import torch

__all__ = ["seeds", "model_configs", "params", "token_batches", "pytrees", "tensors", "shapes",
           "op_inputs", "SAFE_BOUNDS", "ATTENTION_TYPES", "POSITION_ENCODINGS", "NORMS", "ACTIVATIONS"]

# magnitudes a product or a softmax of a few such values cannot overflow, per dtype
SAFE_BOUNDS = {torch.float64: 1e6, torch.float32: 1e3, torch.float16: 10.0, torch.bfloat16: 10.0}

from ..config import POSITION_ENCODINGS  # noqa: E402
from ..layers.attention import ATTENTION_TYPES  # noqa: E402
from ..layers.basic import NORMS  # noqa: E402
from ..layers.mlp import ACTIVATIONS  # noqa: E402


def seeds() -> st.SearchStrategy:
    return st.integers(0, 2**31 - 1)


def _choices(name: str, given: Optional[Sequence], allowed: Sequence) -> list:
    if given is None:
        return list(allowed)
    given = [given] if isinstance(given, str) else list(given)
    bad = [g for g in given if g not in allowed]
    if bad or not given:
        raise ValueError(f"{name}={given!r}: expected a non-empty subset of {list(allowed)}")
    return given


@st.composite
def model_configs(
    draw,
    *,
    attention_types: Optional[Sequence[str]] = None,
    position_encodings: Optional[Sequence[str]] = None,
    norms: Optional[Sequence[str]] = None,
    activations: Optional[Sequence[str]] = None,
    gqa: Optional[bool] = None,
    max_layers: int = 2,
    max_heads: int = 4,
    max_seq_len: int = 16,
    dropout: float = 0.0,
    **fixed: Any,
):
    """Small valid :class:`~aam_func.ModelConfig` s. Filters take a name or a list of names;
    ``gqa=True`` forces fewer kv heads than heads, ``False`` forbids it, None draws either;
    ``fixed`` fields are passed through unchanged (e.g. ``fused_cross_entropy=False``)."""
    from ..config import ModelConfig

    att = draw(st.sampled_from(_choices("attention_types", attention_types, ATTENTION_TYPES)))
    pos = draw(st.sampled_from(_choices("position_encodings", position_encodings, POSITION_ENCODINGS)))
    heads_choices = [h for h in (1, 2, 4) if h <= max_heads] or [1]
    if gqa:
        heads_choices = [h for h in heads_choices if h > 1]
        if not heads_choices:
            raise ValueError(f"gqa=True needs max_heads >= 2, got max_heads={max_heads}")
    n_heads = draw(st.sampled_from(heads_choices))
    kv_options = [k for k in (1, 2, 4) if n_heads % k == 0 and (gqa is None or (k < n_heads) == gqa)]
    n_kv = draw(st.sampled_from(kv_options))
    head_dim = draw(st.sampled_from([2, 4]))  # even: rope needs it
    kw = dict(
        vocab_size=draw(st.integers(5, 40)),
        d_model=n_heads * head_dim,
        n_layers=draw(st.integers(1, max(1, max_layers))),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        max_seq_len=max_seq_len,
        dropout=dropout,
        attention_type=att,
        position_encoding=pos,
        norm=draw(st.sampled_from(_choices("norms", norms, NORMS))),
        activation=draw(st.sampled_from(_choices("activations", activations, ACTIVATIONS))),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
    )
    if att != "standard":
        kw["max_relative_position"] = draw(st.integers(1, 4))
    if att == "sparse":
        kw["sparse_pattern"] = draw(st.sampled_from(["strided", "fixed"]))
    if att == "relative":
        kw["use_relative_pos"] = True
    if pos == "rope":
        kw["use_rope"] = True
    kw.update(fixed)
    return ModelConfig(**kw)


@st.composite
def params(draw, spec: Any, *, dtype: Optional[torch.dtype] = None):
    """``spec.init`` with a drawn seed (a Transformer's ``init(seed=...)`` or a layer spec's
    ``init(generator)``), cast to ``dtype`` if given."""
    from .. import tree

    seed = draw(seeds())
    if not hasattr(spec, "init"):
        raise TypeError(f"params(spec): spec must have an init method, got {type(spec).__name__}")
    try:
        p = spec.init(seed=seed)
    except TypeError:
        p = spec.init(torch.Generator().manual_seed(seed))
    return p if dtype is None else tree.cast(p, dtype)


@st.composite
def token_batches(draw, cfg: Any, *, padding: Optional[str] = None, max_batch: int = 3, max_seq: Optional[int] = None,
                  labels: bool = True):
    """``{"input_ids", "attention_mask", "position_ids", "labels"}`` for ``cfg``: ids in
    ``[0, vocab)``; ``padding`` None (no padding), "left", "right" or "any" (each row drawn);
    every row keeps at least one real token; padded positions carry label -100 and, on the
    left, real tokens keep positions 0, 1, ... (as a generation loop passes them)."""
    if padding not in (None, "left", "right", "any"):
        raise ValueError(f"padding={padding!r}: expected None, 'left', 'right' or 'any'")
    max_seq = min(cfg.max_seq_len, max_seq or 12)
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_seq))
    rows = draw(st.lists(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=T, max_size=T), min_size=B, max_size=B))
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        side = padding if padding != "any" else draw(st.sampled_from([None, "left", "right"]))
        n_pad = 0 if side is None else draw(st.integers(0, T - 1))
        if n_pad and side == "left":
            mask[b, :n_pad] = 0
        elif n_pad:
            mask[b, T - n_pad:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if labels:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def shapes(*, min_dims: int = 0, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy:
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def tensors(draw, shape: Any = None, dtype: torch.dtype = torch.float32, elements: Optional[st.SearchStrategy] = None,
            requires_grad: bool = False):
    """A tensor of ``shape`` (a tuple, or a strategy of tuples; default :func:`shapes`).
    Floating dtypes draw finite values within ``±SAFE_BOUNDS[dtype]`` unless ``elements`` is
    given; integer dtypes draw from -100..100; bool from booleans."""
    shp = draw(shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape)) if shape is not None else shapes())
    n = math.prod(shp)
    if elements is None:
        if dtype.is_floating_point:
            bound = SAFE_BOUNDS.get(dtype, 1e3)
            elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                                 width=64 if dtype == torch.float64 else 32)
        elif dtype == torch.bool:
            elements = st.booleans()
        else:
            elements = st.integers(-100, 100)
    values = draw(st.lists(elements, min_size=n, max_size=n))
    t = torch.tensor(values, dtype=dtype).reshape(shp)
    return t.requires_grad_() if requires_grad else t


def _leaf_names(draw, n: int, dotted: bool) -> list:
    part = st.text(alphabet="abcdefgh_", min_size=1, max_size=4)
    name = st.lists(part, min_size=1, max_size=3).map(".".join) if dotted else part
    return draw(st.lists(name, min_size=n, max_size=n, unique=True))


@st.composite
def pytrees(draw, leaves: Optional[st.SearchStrategy] = None, *, max_depth: int = 3, max_width: int = 3,
            dotted_names: bool = True, none_leaves: bool = True, containers: Sequence[str] = ("dict", "list", "tuple")):
    """Trees of tensors: nested dicts (string keys), lists and tuples, with ``None`` leaves if
    ``none_leaves``; with ``dotted_names`` some dicts are flat ``state_dict``-style dicts whose
    keys hold dots (``"blocks.0.w"``) and whose values are leaves."""
    leaf = leaves if leaves is not None else tensors(shapes(max_dims=2, max_side=3))
    leaf_or_none = st.one_of(st.none(), leaf) if none_leaves else leaf
    bad = [c for c in containers if c not in ("dict", "list", "tuple")]
    if bad or not containers:
        raise ValueError(f"containers={containers!r}: expected a non-empty subset of ('dict', 'list', 'tuple')")

    def node(depth: int):
        if depth >= max_depth or draw(st.integers(0, 3)) == 0:
            return draw(leaf_or_none)
        kind = draw(st.sampled_from(list(containers) + (["flat"] if dotted_names and "dict" in containers else [])))
        n = draw(st.integers(0 if kind != "flat" else 1, max_width))
        if kind == "flat":
            return {k: draw(leaf_or_none) for k in _leaf_names(draw, n, dotted=True)}
        children = [node(depth + 1) for _ in range(n)]
        if kind == "dict":
            return dict(zip(_leaf_names(draw, n, dotted=False), children))
        return children if kind == "list" else tuple(children)

    return node(0)


@st.composite
def op_inputs(draw, spec: Any, *, scale: float = 0.1):
    """``(args, kwargs)`` for an :class:`~aam_func.ops.registry.OpSpec`: one of its samples with
    each differentiated input (float tensor with requires_grad) moved by a drawn perturbation
    of at most ``scale`` per element; shapes, dtypes and fixed arguments stay the sample's."""
    samples = spec.samples()
    args, kwargs = samples[draw(st.integers(0, len(samples) - 1))]
    g = torch.Generator().manual_seed(draw(seeds()))
    amount = draw(st.floats(0.0, scale, allow_nan=False))
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad:
            noise = torch.rand(a.shape, generator=g, dtype=a.dtype) * 2 - 1
            a = (a.detach() + amount * noise).requires_grad_()
        out.append(a)
    return tuple(out), dict(kwargs)
