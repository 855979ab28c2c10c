"""Quick start: build a small GPT, train it for a few steps with torch.func.grad and
aam_func.optim.adamw, print the loss.

    python examples/quickstart.py

Everything is a pure function over a dict of tensors: the model is a frozen spec, the params are
a nested dict, the gradient is torch.func.grad of a plain loss function.
"""

import time

import torch
from torch.func import grad

import aam_func as af


def main(steps: int = 30, seed: int = 0) -> float:
    torch.manual_seed(seed)
    text = open(__file__, encoding="utf-8").read()  # a tiny byte-level corpus: this very file
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    cfg = af.ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0)
    model = af.Transformer(cfg)
    params = model.init(seed=seed)
    print(f"model: {af.tree.count(params) / 1e6:.2f}M params")

    def loss_fn(params, ids):
        return model.apply(params, ids, labels=ids)["loss"]

    grad_fn = grad(loss_fn)
    optimizer = af.optim.adamw(learning_rate=3e-3, weight_decay=0.1, mask=af.optim.decay_mask(params))
    opt_state = optimizer.init(params)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - cfg.max_seq_len, (8,), generator=g)
        batch = torch.stack([data[s : s + cfg.max_seq_len] for s in starts])
        grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = af.optim.apply_updates(params, updates)  # out of place: a new params tree
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss_fn(params, batch).item():.4f}")
    final = loss_fn(params, batch).item()
    print(f"done in {time.perf_counter() - start:.1f}s; final loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
