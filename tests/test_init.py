import math

import pytest
import torch
from torch import nn

from aam_func import init


CASES = [
    ("xavier_uniform", lambda t, g: nn.init.xavier_uniform_(t, gain=1.3, generator=g), dict(gain=1.3)),
    ("xavier_normal", lambda t, g: nn.init.xavier_normal_(t, generator=g), {}),
    ("kaiming_uniform", lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g), dict(a=math.sqrt(5))),
    (
        "kaiming_normal",
        lambda t, g: nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g),
        dict(mode="fan_out", nonlinearity="relu"),
    ),
    ("normal", lambda t, g: nn.init.normal_(t, std=0.02, generator=g), dict(std=0.02)),
    ("trunc_normal", lambda t, g: nn.init.trunc_normal_(t, std=0.5, a=-1, b=1, generator=g), dict(std=0.5, a=-1, b=1)),
    ("uniform", lambda t, g: nn.init.uniform_(t, -0.1, 0.1, generator=g), dict(a=-0.1, b=0.1)),
]


@pytest.mark.parametrize("name, torch_fn, kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 2)])
def test_equals_torch_nn_init(name, torch_fn, kw, shape):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = getattr(init, name)(shape, g1, **kw)
    ref = torch_fn(torch.empty(shape), g2)
    assert torch.equal(ours, ref)
    assert torch.equal(g1.get_state(), g2.get_state())  # the stream advanced identically


def test_dtype_zeros_ones():
    g = torch.Generator().manual_seed(0)
    assert init.xavier_uniform((3, 4), g, torch.float64).dtype == torch.float64
    assert torch.equal(init.zeros((2, 3)), torch.zeros(2, 3))
    assert torch.equal(init.ones((2,)), torch.ones(2))


def test_statistics():
    g = torch.Generator().manual_seed(0)
    w = init.kaiming_normal((512, 256), g, mode="fan_in", nonlinearity="relu")
    assert abs(w.std().item() - math.sqrt(2 / 256)) < 0.01 * math.sqrt(2 / 256) * 5
    b = math.sqrt(6 / (512 + 256))
    x = init.xavier_uniform((512, 256), g)
    assert x.abs().max() <= b and x.abs().max() > 0.95 * b


def test_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.xavier_uniform((3,), g)
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal((3, 3), g, mode="fan_avg")
    with pytest.raises(ValueError, match="nonlinearity"):
        init.kaiming_uniform((3, 3), g, nonlinearity="gelu")
    with pytest.raises(ValueError, match="a < b"):
        init.trunc_normal((3,), g, a=1, b=0)
    with pytest.raises(ValueError, match="std must be a finite number >= 0, got -1"):
        init.normal((3,), g, std=-1)
    with pytest.raises(TypeError, match="std must be a finite number >= 0, got True"):  # used to mean std 1
        init.normal((3,), g, std=True)
    with pytest.raises(ValueError, match="std"):
        init.normal((3,), g, std=-1)
    with pytest.raises(ValueError, match="seed"):
        init.generator(None)
    with pytest.raises(TypeError, match="seed"):
        init.generator(1.5)


def test_abstract_init_samples_nothing_and_keeps_shapes():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with init.abstract():
        w = init.xavier_uniform((3, 4), g, torch.float64)
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            init.kaiming_normal((3,), g)
    assert w.is_meta and w.shape == (3, 4) and w.dtype == torch.float64
    assert torch.equal(g.get_state(), state)
    assert not init.normal((2,), g).is_meta  # outside the context, real sampling again
