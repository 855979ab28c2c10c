"""aam_func.intercept: uses of watched tensors found by identity, reported to one client protocol."""

import pytest
import torch
import torch.nn.functional as F

from aam_func.intercept import Client, Intercept


class Log(Client):
    def __init__(self):
        self.events = []

    def linear(self, use):
        self.events.append((use.kind, use.key))
        return use.run()

    def embedding(self, use):
        self.events.append(("embedding", use.key, use.padding_idx, use.plain))
        return use.run()

    def other(self, key, tensor):
        self.events.append(("other", key))
        return tensor


def test_metadata_reads_are_not_uses_and_value_reads_are():
    w = torch.randn(3, 4)
    log = Log()
    with Intercept({"w": w}, log):
        assert w.shape == (3, 4) and w.dtype == torch.float32 and w.size(1) == 4 and w.dim() == 2
        assert len(w) == 3 and w.numel() == 12 and w.is_floating_point() and w.device.type == "cpu"
        assert log.events == []
        w.T, w.t(), w @ torch.randn(4), w[0], w * 2  # noqa: B018
    assert log.events == [("other", "w")] * 5


def test_recognised_uses_and_their_slots():
    w, v, b = torch.randn(3, 4), torch.randn(4, 4), torch.randn(3)
    x = torch.randn(2, 4)
    log = Log()
    with Intercept({"w": w, "v": v}, log):
        y = F.linear(x, w, b)
        F.linear(input=v, weight=w)  # v is the input here: an other use of v, a linear use of w
        torch.addmm(b, x, torch.ones(4, 3))  # not watched: nothing
        torch.addmm(torch.zeros(4), x, v)
        torch.addmm(torch.zeros(4), x, v, beta=0.5)  # beta changes the op: an other use
        F.embedding(torch.tensor([0, 2]), v, padding_idx=-1)
        F.embedding(torch.tensor([0, 2]), v, max_norm=1.0)
        F.linear(x, w.clone())  # clone reads w (an other use); the equal copy is not watched
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert log.events == [("linear", "w"), ("other", "v"), ("linear", "w"), ("addmm", "v"), ("other", "v"),
                          ("embedding", "v", 3, True), ("embedding", "v", None, False), ("other", "w")]


def test_the_client_chooses_what_the_op_sees():
    w = torch.randn(3, 4)

    class Doubled(Client):
        def linear(self, use):
            return use.run(2 * use.weight)

        def other(self, key, tensor):
            return 2 * tensor

    x = torch.randn(2, 4)
    with Intercept({"w": w}, Doubled()):
        got = F.linear(x, w), x @ w.t(), torch.cat([w, w])
    want = x @ (2 * w).t(), x @ (2 * w).t(), torch.cat([2 * w, 2 * w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_one_tensor_under_two_keys_is_an_error():
    w = torch.randn(2, 2)
    with pytest.raises(ValueError, match="same tensor object"):
        Intercept({"a": w, "b": w}, Client())


def test_conv_uses_are_recognised_with_their_options_and_default_to_other_uses():
    w2, w1 = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 2)
    x2, x1 = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 7)

    class Convs(Log):
        def conv(self, use):
            self.events.append(("conv", use.key, use.options, use.plain))
            return use.run()

    log = Convs()
    with Intercept({"w2": w2, "w1": w1}, log):
        y = F.conv2d(x2, w2, None, 2, 1)
        F.conv1d(x1, w1, dilation=2, padding="same")
        F.conv2d(torch.randn(1, 6, 5, 5), torch.randn(6, 2, 3, 3), groups=3)  # not watched: nothing
        F.conv1d(x1, w1 * 1.0)  # the product reads w1: an other use; the conv of the product is not watched
    torch.testing.assert_close(y, F.conv2d(x2, w2, None, 2, 1))
    plain2 = {"stride": 2, "padding": 1, "dilation": 1, "groups": 1}
    plain1 = {"stride": 1, "padding": "same", "dilation": 2, "groups": 1}
    assert log.events == [("conv", "w2", plain2, True), ("conv", "w1", plain1, True), ("other", "w1")]
    grouped, wg = Convs(), torch.randn(6, 2, 3, 3)
    with Intercept({"g": wg}, grouped):
        F.conv2d(torch.randn(1, 6, 5, 5), wg, groups=3)
    assert grouped.events == [("conv", "g", {"stride": 1, "padding": 0, "dilation": 1, "groups": 3}, False)]
    base = Log()  # a client without conv(): the conv weight is an other use
    with Intercept({"w2": w2}, base):
        F.conv2d(x2, w2)
    assert base.events == [("other", "w2")]


def test_ops_replace_every_call_watched_or_not_and_only_known_functions():
    w, v = torch.randn(5, 3), torch.randn(5, 3)
    ids = torch.tensor([[0, 4, 2]])
    calls = []

    def doubled(func, bound):
        calls.append(bound["weight"] is w)
        return 2 * func(**bound)

    log = Log()
    with Intercept({"w": w}, log, ops={F.embedding: doubled}):
        a = F.embedding(ids, w, padding_idx=0)  # a recognised use: use.run() goes through ops too
        b = F.embedding(ids, v)  # not watched
    torch.testing.assert_close(a, 2 * F.embedding(ids, w))
    torch.testing.assert_close(b, 2 * F.embedding(ids, v))
    assert calls == [True, False] and log.events == [("embedding", "w", 0, True)]
    with pytest.raises(ValueError, match="ops: .*not one of the functions"):
        Intercept({}, Client(), ops={F.linear: doubled})
