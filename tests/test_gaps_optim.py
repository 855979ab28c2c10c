"""Optimizer paths mutation testing found unchecked: sgd and lion with a schedule (the
learning rate read at each step's count) and ``scale_by_learning_rate(flip_sign=False)``."""

import torch

from aam_func import optim


def _steps(opt, grads_seq, params):
    state = opt.init(params)
    out = []
    for g in grads_seq:
        u, state = opt.update(g, state, params)
        out.append(u)
    return out


def _grads(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, generator=g, dtype=torch.float64)} for _ in range(n)]


def sched(t):
    return 0.1 * (1.0 + torch.as_tensor(t, dtype=torch.float64))  # 0.1, 0.2, 0.3, ... at counts 0, 1, 2


def test_sgd_with_a_schedule_uses_the_rate_of_each_step():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    gs = _grads(3)
    for t, (u, g) in enumerate(zip(_steps(optim.sgd(learning_rate=sched), gs, params), gs)):
        torch.testing.assert_close(u["w"], -0.1 * (t + 1) * g["w"])


def test_sgd_momentum_with_a_schedule():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    gs = _grads(3, seed=1)
    buf = torch.zeros(3, dtype=torch.float64)
    for t, (u, g) in enumerate(zip(_steps(optim.sgd(learning_rate=sched, momentum=0.9), gs, params), gs)):
        buf = 0.9 * buf + g["w"] if t else g["w"].clone()
        torch.testing.assert_close(u["w"], -0.1 * (t + 1) * buf)


def test_lion_with_a_schedule_and_weight_decay():
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    gs = _grads(3, seed=2)
    m = torch.zeros(3, dtype=torch.float64)
    b1, b2, wd = 0.9, 0.99, 0.1
    for t, (u, g) in enumerate(zip(_steps(optim.lion(learning_rate=sched, b1=b1, b2=b2, weight_decay=wd), gs, params), gs)):
        direction = torch.sign(b1 * m + (1 - b1) * g["w"]) + wd * params["w"]
        torch.testing.assert_close(u["w"], -0.1 * (t + 1) * direction)
        m = b2 * m + (1 - b2) * g["w"]


def test_scale_by_learning_rate_without_flipping_the_sign():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    gs = _grads(2, seed=3)
    for t, (u, g) in enumerate(zip(_steps(optim.scale_by_learning_rate(0.5, flip_sign=False), gs, params), gs)):
        torch.testing.assert_close(u["w"], 0.5 * g["w"])
    for t, (u, g) in enumerate(zip(_steps(optim.scale_by_learning_rate(sched, flip_sign=False), gs, params), gs)):
        torch.testing.assert_close(u["w"], 0.1 * (t + 1) * g["w"])
    for t, (u, g) in enumerate(zip(_steps(optim.scale_by_learning_rate(sched), gs, params), gs)):
        torch.testing.assert_close(u["w"], -0.1 * (t + 1) * g["w"])
