"""The training loop written out by hand: torch.func.grad for gradients, aam_func.optim for
updates, nothing hidden. (``aam_func.train.make_train_step`` packages exactly this, plus mixed
precision, accumulation and compile; ``aam_func.run`` (what ``aam-func train`` calls) adds data,
checkpoints, resume and logging:
``aam_func.run.train(aam_func.run.RunConfig(steps=150), log=aam_func.run.console, progress=True)``.)

    python examples/functional_loop.py    # 150 steps of a 0.7M-parameter GPT; prints held-out perplexity vs the unigram baseline
"""

import math
import time

import torch

import aam_func as af
from aam_func import optim, tree
from aam_func.data import BlockLoader, load_split, pack, tokenize_documents, unigram_perplexity
from aam_func.tokenizer import Tokenizer

STEPS, BATCH, SEQ = 150, 16, 64

# data: Python's reference text, a byte-level BPE trained on it, packed into blocks
train_docs, val_docs = load_split(None, val_fraction=0.1)
tok = Tokenizer.train_bpe(train_docs, vocab_size=2048)
train_ids, val_ids = tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok)
loader = BlockLoader(pack(train_ids, SEQ), BATCH, seed=0)
val_blocks = pack(val_ids, SEQ)[:64]

# model: a spec and a tree of tensors
cfg = af.ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=2, n_heads=4, max_seq_len=SEQ, dropout=0.0,
                     position_encoding="learnable")
model = af.Transformer(cfg)
params = model.init(seed=0)


def loss_fn(params, input_ids):
    return model.apply(params, input_ids, labels=input_ids)["loss"]


# optimizer: a pair of pure functions (init, update); its state is a tree like params. The recipe
# is chain(clip_by_global_norm(1.0), adamw(warmup_cosine(...), weight_decay, mask=decay_mask(params)))
opt = optim.adamw_warmup_cosine(params, learning_rate=3e-3, total_steps=STEPS, warmup_steps=10, end_value=3e-4,
                                weight_decay=0.1, max_grad_norm=1.0)
opt_state = opt.init(params)
grad_and_loss = torch.func.grad_and_value(loss_fn)

t0 = time.perf_counter()
for step in range(STEPS):
    ids = loader.batch(step)["input_ids"]
    grads, loss = grad_and_loss(params, ids)                       # grads: same tree as params
    updates, opt_state = opt.update(grads, opt_state, params)      # new state; nothing in place
    params = optim.apply_updates(params, updates)                  # new params
    if step % 25 == 0 or step == STEPS - 1:
        print(f"step {step:4d}  loss {float(loss):.3f}  grad norm {float(optim.last_global_norm(opt_state)):.2f}")

with torch.no_grad():
    val = float(loss_fn(params, val_blocks))
print(f"held-out perplexity {math.exp(val):.1f} (unigram baseline {unigram_perplexity(train_ids, val_ids, cfg.vocab_size):.1f}); "
      f"{tree.count(params) / 1e6:.2f}M params, {time.perf_counter() - t0:.0f}s")
