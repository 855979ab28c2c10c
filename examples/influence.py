"""Which training blocks drove this completion? Train a small GPT briefly on the embedded corpus
(Python's language reference), then score every training block's influence on a held-out
completion with EK-FAC (aam_func.research) and print the top ones.

    python examples/influence.py                          # ~100 steps, 1000 blocks scored
    python examples/influence.py --steps 400 --blocks 4000 --method cg
    python examples/influence.py --spectrum spectrum.png  # + top Hessian eigenvalues over training (matplotlib)

Byte-level tokens (vocab 256), the default run's shape (d_model 256, 4 layers, 8 heads) at
sequence length 64; the flags make it smaller or larger. Influence score of training block i on
the query: ⟨∇ℓ_i, (F + λI)⁻¹ ∇ℓ_query⟩ (F: EK-FAC of the empirical Fisher from --fit blocks, or
the GGN by conjugate gradients with --method cg). Training gradients come in chunks from the
ghost route (per_sample.grads), so --blocks can be large.
"""

from __future__ import annotations

import argparse
import time

import torch

import aam_func as af
from aam_func.data.corpus import default_corpus
from aam_func.research import Problem, ggn_vp, hessian_vp, influence, kfac, lanczos


def blocks_of(texts, seq_len):
    data = torch.tensor(list("\n".join(texts).encode("utf-8")), dtype=torch.long)
    n = len(data) // seq_len
    return data[: n * seq_len].reshape(n, seq_len)


def train(model, params, train_blocks, steps, lr, seed, on_step=None):
    loss_fn = lambda p, ids: model.apply(p, ids, labels=ids)["loss"]  # noqa: E731
    opt = af.optim.adamw(learning_rate=lr, weight_decay=0.1, mask=af.optim.decay_mask(params))
    state = opt.init(params)
    g = torch.Generator().manual_seed(seed)
    grad_fn = torch.func.grad(loss_fn)
    for step in range(1, steps + 1):
        batch = train_blocks[torch.randint(0, len(train_blocks), (16,), generator=g)]
        updates, state = opt.update(grad_fn(params, batch), state, params)
        params = af.optim.apply_updates(params, updates)
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"step {step:4d}  loss {loss_fn(params, batch).item():.3f}")
        if on_step is not None:
            on_step(step, params)
    return params


def top_eigenvalue(model, params, blocks):
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    y = torch.cat([blocks[:, 1:], torch.full((len(blocks), 1), -100)], 1)
    vals, _ = lanczos(lambda v: hessian_vp(problem, params, blocks, y, v), params, k=3, iterations=8,
                      generator=torch.Generator().manual_seed(0))
    return vals.tolist()


def show(title, ids):
    text = bytes(ids.tolist()).decode("utf-8", errors="replace").replace("\n", "⏎")
    print(f"{title}: {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=1000, help="training blocks to score")
    ap.add_argument("--fit", type=int, default=128, help="blocks for the EK-FAC factors / the GGN")
    ap.add_argument("--method", choices=("ekfac", "cg"), default="ekfac")
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spectrum", default=None, help="PNG path: plot the top Hessian eigenvalues over training")
    a = ap.parse_args(argv)

    docs = default_corpus()
    held_out = blocks_of(docs[-20:], a.seq_len)
    train_blocks = blocks_of(docs[:-20], a.seq_len)
    cfg = af.ModelConfig(vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=8, max_seq_len=a.seq_len,
                         dropout=0.0)
    model = af.Transformer(cfg)
    params = model.init(seed=a.seed)
    print(f"{af.tree.count(params) / 1e6:.2f}M params, {len(train_blocks)} training blocks of {a.seq_len} bytes")

    spectrum = []
    probe = train_blocks[:8]
    every = max(1, a.steps // 4)
    hook = (lambda s, p: spectrum.append((s, top_eigenvalue(model, p, probe))) if s % every == 0 else None) \
        if a.spectrum else None
    start = time.perf_counter()
    params = train(model, params, train_blocks, a.steps, a.lr, a.seed, hook)
    print(f"trained in {time.perf_counter() - start:.0f}s")

    query = held_out[:1]
    scored = train_blocks[torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(a.seed))[: a.blocks]]
    loss_fn = lambda p, ids: model.apply(p, ids, labels=ids)["loss"]  # noqa: E731
    problem = Problem(lambda p, x: model.apply(p, x)["logits"])
    fit = scored[: a.fit]
    targets = torch.cat([fit[:, 1:], torch.full((len(fit), 1), -100)], 1)
    start = time.perf_counter()
    if a.method == "ekfac":
        facs = kfac.collect(problem, params, fit, targets, fisher="empirical", chunk_size=32)
        facs = kfac.eigen_correct(problem, params, fit, targets, facs, chunk_size=32)
        ihvp = influence.ekfac_ihvp(facs, damping=a.damping)
    else:
        ihvp = influence.cg_ihvp(lambda v: ggn_vp(problem, params, fit, targets, v, chunk_size=32),
                                 damping=a.damping, iterations=20)
    scores = influence.scores(loss_fn, params, scored, query, ihvp, chunk_size=64)[:, 0]
    print(f"scored {len(scored)} blocks in {time.perf_counter() - start:.0f}s ({a.method})")
    show("\nquery (held out)", query[0])
    for rank, i in enumerate(torch.topk(scores, 5).indices.tolist(), 1):
        show(f"#{rank} score {scores[i]:.3g}", scored[i])
    if a.spectrum:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in spectrum]
        for k in range(3):
            plt.plot(steps, [v[k] for _, v in spectrum], marker="o", label=f"λ{k + 1}")
        plt.xlabel("step")
        plt.ylabel("Hessian eigenvalue (8 blocks)")
        plt.legend()
        plt.savefig(a.spectrum, dpi=100)
        print(f"spectrum -> {a.spectrum}")
    return scores


if __name__ == "__main__":
    main()
