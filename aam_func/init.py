"""Initializers as pure functions of ``(shape, generator, dtype)``.

Each returns a fresh tensor and equals the matching ``torch.nn.init`` function applied to an
empty tensor with the same generator state (they share torch's sampling code, so the random
stream is consumed identically). Fan-in/fan-out follow torch: for a weight of shape
``(out, in, *kernel)``, ``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .checks import ArgumentTypeError, check_choice, check_number, is_int

__all__ = [
    "zeros",
    "ones",
    "normal",
    "trunc_normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "generator",
    "abstract",
    "WEIGHT_INITS",
    "weight",
]

# the named schemes a config may ask for (ModelConfig.weight_init) and layers build with
WEIGHT_INITS = ("normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")

Shape = Sequence[int]


def generator(seed: int | torch.Generator | None = None) -> torch.Generator:
    """A CPU ``torch.Generator`` from a seed (an int), or the generator itself."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("seed must be an int or a torch.Generator, got None (randomness is explicit)")
    if not is_int(seed):
        raise ArgumentTypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


_ABSTRACT = contextvars.ContextVar("aam_func_abstract_init", default=False)


@contextlib.contextmanager
def abstract():
    """Inside, initializers sample nothing and return meta tensors: shapes and dtypes only.

    ``Transformer.param_shapes`` uses it to know a model's structure without the cost of an init.
    """
    token = _ABSTRACT.set(True)
    try:
        with torch._C._DisableFuncTorch(), torch.device("meta"):
            yield
    finally:
        _ABSTRACT.reset(token)


def _empty(shape: Shape, dtype: torch.dtype | None) -> Tensor:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return torch.empty(shape, dtype=dtype or torch.get_default_dtype())


def _fill(fill_, shape: Shape, dtype, **kwargs) -> Tensor:
    """``fill_(empty tensor, **kwargs)`` (a ``torch.nn.init`` function), or an uninitialised
    tensor inside :func:`abstract`, where only shapes matter."""
    if _ABSTRACT.get():
        return _empty(shape, dtype)
    with torch.no_grad():
        return fill_(_empty(shape, dtype), **kwargs)


def _fans(shape: Shape, what: str) -> None:
    if len(shape) < 2:
        raise ValueError(f"{what} needs a shape with at least 2 dimensions (out, in, ...), got {tuple(shape)}")


def zeros(shape: Shape, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
    return torch.zeros(tuple(shape), dtype=dtype or torch.get_default_dtype())


def ones(shape: Shape, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
    return torch.ones(tuple(shape), dtype=dtype or torch.get_default_dtype())


def normal(shape: Shape, generator: torch.Generator, dtype=None, *, mean: float = 0.0, std: float = 1.0) -> Tensor:
    check_number("std", std, min=0)
    return _fill(nn.init.normal_, shape, dtype, mean=mean, std=std, generator=generator)


def trunc_normal(
    shape: Shape, generator: torch.Generator, dtype=None, *, mean=0.0, std=1.0, a=-2.0, b=2.0
) -> Tensor:
    """Normal(mean, std) truncated to [a, b] (absolute bounds, as ``torch.nn.init.trunc_normal_``)."""
    if not a < b:
        raise ValueError(f"trunc_normal needs a < b, got a={a}, b={b}")
    return _fill(nn.init.trunc_normal_, shape, dtype, mean=mean, std=std, a=a, b=b, generator=generator)


def uniform(shape: Shape, generator: torch.Generator, dtype=None, *, a: float = 0.0, b: float = 1.0) -> Tensor:
    return _fill(nn.init.uniform_, shape, dtype, a=a, b=b, generator=generator)


def xavier_uniform(shape: Shape, generator: torch.Generator, dtype=None, *, gain: float = 1.0) -> Tensor:
    """U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    _fans(shape, "xavier_uniform")
    return _fill(nn.init.xavier_uniform_, shape, dtype, gain=gain, generator=generator)


def xavier_normal(shape: Shape, generator: torch.Generator, dtype=None, *, gain: float = 1.0) -> Tensor:
    """N(0, std²), std = gain * sqrt(2 / (fan_in + fan_out))."""
    _fans(shape, "xavier_normal")
    return _fill(nn.init.xavier_normal_, shape, dtype, gain=gain, generator=generator)


def _check_kaiming(mode, nonlinearity):
    check_choice("mode", mode, ("fan_in", "fan_out"))
    known = ("linear", "conv1d", "conv2d", "conv3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
    check_choice("nonlinearity", nonlinearity, known)


def _kaiming(fill_, what: str, shape: Shape, generator, dtype, a: float, mode: str, nonlinearity: str) -> Tensor:
    _fans(shape, what)
    _check_kaiming(mode, nonlinearity)
    return _fill(fill_, shape, dtype, a=a, mode=mode, nonlinearity=nonlinearity, generator=generator)


def kaiming_uniform(
    shape: Shape, generator: torch.Generator, dtype=None, *, a: float = 0.0, mode="fan_in", nonlinearity="leaky_relu"
) -> Tensor:
    """U(-b, b), b = gain * sqrt(3 / fan_mode) (He et al. 2015). ``a=sqrt(5)`` is nn.Linear's default."""
    return _kaiming(nn.init.kaiming_uniform_, "kaiming_uniform", shape, generator, dtype, a, mode, nonlinearity)


def kaiming_normal(
    shape: Shape, generator: torch.Generator, dtype=None, *, a: float = 0.0, mode="fan_in", nonlinearity="leaky_relu"
) -> Tensor:
    """N(0, std²), std = gain / sqrt(fan_mode)."""
    return _kaiming(nn.init.kaiming_normal_, "kaiming_normal", shape, generator, dtype, a, mode, nonlinearity)


def linear_bias(shape: Shape, fan_in: int, generator: torch.Generator, dtype=None) -> Tensor:
    """nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(shape, generator, dtype, a=-bound, b=bound)


def weight(shape: Shape, generator: torch.Generator, kind: str, std: float = 0.02, dtype=None) -> Tensor:
    """A weight of ``shape`` by the scheme named ``kind`` (:data:`WEIGHT_INITS`): ``normal`` is
    N(0, std²) (GPT-2), ``kaiming_uniform`` torch's ``nn.Linear`` default (a = √5),
    ``kaiming_normal`` fan-out with ReLU gain, ``xavier_*`` gain 1."""
    if kind == "normal":
        return normal(shape, generator, dtype, std=std)
    if kind == "kaiming_uniform":
        return kaiming_uniform(shape, generator, dtype, a=math.sqrt(5))
    if kind == "kaiming_normal":
        return kaiming_normal(shape, generator, dtype, mode="fan_out", nonlinearity="relu")
    if kind == "xavier_uniform":
        return xavier_uniform(shape, generator, dtype)
    if kind == "xavier_normal":
        return xavier_normal(shape, generator, dtype)
    raise ValueError(f"init must be one of {WEIGHT_INITS}, got {kind!r}")
