"""The equivalent mutants of scripts/mutation.py: mutant id -> why no test can tell it from the
original (the same values on every input the code can receive). Left out of the score."""

EQUIVALENT: dict[str, str] = {
    "aam_func/ops/attention/backends.py:118:23:And->Or":
        "flex_available is read only by _route_mods, which runs only for calls with mods and itself "
        "requires device == 'cuda'; so 'mods or ...' and 'mods and ...' route every call alike",
    "aam_func/privacy/renyi.py:151:30:Gt->GtE":
        "the line above breaks out when factor == 0, so factor is never 0 here and > and >= agree",
    "aam_func/ops/cross_entropy.py:154:61:0->1":
        "with no chunk (0 tokens) valid has shape (0,), and torch.where broadcasts a (1,) "
        "per_token to (0,): the same empty result",
    "aam_func/ops/attention/masks.py:226:37:drop USub":
        "qe.shape[:-2] -> qe.shape[:2]: the one caller (dense.reference) passes 4-d q (B, H, Tq, d), "
        "so both are (B, H)",
    "aam_func/privacy/renyi.py:132:26:1.0->2.0":
        "the series' sign variable is only compared with 0 and multiplied by +-1, so 2.0 and 1.0 "
        "have the same sign at every step",
    "aam_func/per_sample/dp.py:46:11:Gt->GtE":
        "with std == 0 the mutant adds 0 * noise: the same values; only the RNG stream moves, "
        "which no contract of dp_aggregate fixes",
    "aam_func/per_sample/factors.py:180:26:1->2":
        "n1 only feeds the cost test that picks between two equal formulas for the squared norm "
        "(the per-example gradient formed once, or the Gram form)",
    "aam_func/per_sample/vmap.py:29:7:GtE->Gt":
        "at chunk == B the chunked loop runs a single chunk of all B examples: the same values",
    "aam_func/ops/attention/kernel.py:267:34:False->True":
        "set_materialize_grads(True) hands the backward zeros instead of None for an output with no "
        "gradient; _blockwise_backward reads None as zeros (dO = zeros_like, D - 0 = D exactly), so every "
        "gradient, also under vmap and double backward, has the same values; only a zeros tensor is allocated",
    "aam_func/privacy/renyi.py:151:47:1.0->2.0":
        "sign is read only by 'sign > 0'; it starts at 1.0 and every factor is non-zero, so multiplying by -2.0 instead of -1.0 flips it at the same steps (its size grows, never to 0 or NaN): every branch is the same",
    "aam_func/privacy/renyi.py:142:11:Gt->GtE":
        "sign starts at 1.0 and is only multiplied by +-1.0 (line 151), so it is never 0 and > 0 and >= 0 agree",
    "aam_func/ops/attention/tiles.py:88:43:And->Or":
        "q_pos is the same arange(i_lo, i_hi + 1) for every key tile of a query tile; building it (and k_pos) in more cases changes no value: ok is built only for a tile that is not full and diag only with padding and a diagonal, cases where the original condition already held",
    "aam_func/ops/attention/tiles.py:113:67:drop USub":
        "gather_last's idx is always the 2-d (bq, bk) index from Tiling.logits, so idx.shape[1:] == idx.shape[-1:]",
    "aam_func/ops/attention/kernel.py:67:40:drop Not":
        "with mods a row with no allowed key has m = -inf and l = 1, so m + log(l) = -inf, the value the where gives; without mods no row of the fixed menu is empty (the diagonal is allowed), so m is finite and both forms are m + log(l); this runs inside autograd.Function.forward, so only values matter",
    "aam_func/ops/attention/masks.py:191:15:Lt->LtE":
        "at rel == max_exact >= 1 T5's log formula gives max_exact + floor(log(1) * ...) = max_exact, the exact branch's value; max_exact = 0 (num_buckets < 4) is refused by RelativeBias before any call",
    "aam_func/ops/attention/mods.py:59:18:1->2":
        "mx is only compared with 0 (mx < 0: any number of positional arguments), so -1 and -2 behave alike",
    "aam_func/ops/attention/mods.py:64:20:99->100":
        "(99, 99) and (100, 99) both exceed every arity a mod is checked against (4 or 5), so the mod is refused either way; the message shows the signature, not these numbers",
    "aam_func/ops/attention/mods.py:64:24:99->100":
        "as mods.py:64:20: any bound above 5 refuses the same mods",
    "aam_func/ops/attention/block_mask.py:45:29:False->True":
        "field(repr=...) only shapes a generated __repr__, and BlockMask defines its own __repr__, which dataclass keeps",
    "aam_func/ops/attention/block_mask.py:46:51:False->True":
        "as block_mask.py:45:29: BlockMask's own __repr__ is kept by dataclass",
    "aam_func/ops/rope.py:82:78:2->3":
        "head_dim is always even (_check refuses odd, rope_cos_sin has no other caller), so head_dim > 2 and > 3 agree",
    "aam_func/ops/rope.py:169:49:2->3":
        "d is always even (checked), so d > 2 and d > 3 agree",
    "aam_func/ops/cross_entropy.py:190:31:0->1":
        "the gh/gw/gb placeholders are never read: backward reads them only on the precompute path, which replaces them",
    "aam_func/ops/cross_entropy.py:242:94:0->1":
        "as cross_entropy.py:190:31: the gb placeholder without a bias is never read",
    "aam_func/ops/cross_entropy.py:240:50:0->1":
        "for N == 1 the zero-filled buffer is overwritten whole by the first group's copy_; only an extra fill",
    "aam_func/ops/cross_entropy.py:295:34:False->True":
        "set_materialize_grads(True) hands zeros instead of None for outputs never used; backward reads None as zeros, so the values are the same (as kernel.py:267)",
    "aam_func/ops/cross_entropy.py:329:57:And->Or":
        "the mutant only adds a bias gradient when the bias needs none; autograd drops it",
    "aam_func/ops/cross_entropy.py:335:33:And->Or":
        "as cross_entropy.py:329:57, on the double-backward path",
    "aam_func/ops/cross_entropy.py:356:99:Add->Sub":
        "jvp runs only when hidden, weight or bias carries a tangent, so dz is always a Tensor and the zeros branch never runs",
    "aam_func/ops/cross_entropy.py:261:40:Add->Sub":
        "gh[s : s - chunk] is an empty view at row s; mm(out=) resizes it in place at the same storage offset, which holds every row, so the rows written are the same (checked bit for bit)",
    "aam_func/losses.py:244:21:1->2":
        "the positives mask of supervised contrastive loss is symmetric, so column sums equal row sums",
    "aam_func/losses.py:249:50:1->2":
        "if one anchor has a positive, that positive has one too, so the count of anchors with positives is 0 or >= 2, and clamp(min=1) and clamp(min=2) agree",
    "aam_func/per_sample/factors.py:70:75:1->2":
        "a 1-d conv gets a spatial dim of size 1 with kernel 1 and padding 0; unfold's length along it is (1 - d*0 - 1)/s + 1 = 1 for any stride",
    "aam_func/per_sample/factors.py:70:90:1->2":
        "as factors.py:70:75, for the dilation",
    "aam_func/per_sample/batched.py:172:65:0->1":
        "nd is read only by bias_grad's conv branch; the uses that reach line 173 with a bias are linear or addmm (norms continue earlier, embeddings have no bias_key)",
    "aam_func/per_sample/ghost.py:93:88:4->5":
        "no recognised op takes a 5-d weight, so such a tensor is never recorded as a use; watching it can only add its name to others, and ghost = recorded - others is unchanged",
    "aam_func/per_sample/ghost.py:154:54:2->3":
        "watching the tables changes no value: _Prober answers a non-ghost use with use.run() and inherits Client.other (no change), exactly what an unwatched tensor gets",
    "aam_func/per_sample/ghost.py:154:54:And->Or":
        "as ghost.py:154:54 (2->3)",
    "aam_func/per_sample/ghost.py:154:70:4->5":
        "as ghost.py:154:54 (2->3)",
    "aam_func/per_sample/ghost.py:169:74:False->True":
        "retain_graph only keeps memory alive; vjp_fn is called once",
    "aam_func/per_sample/factors.py:153:59:False->True":
        "output_mask[0] only computes an input gradient that is discarded",
    "aam_func/per_sample/factors.py:182:39:Mult->Div":
        "the cost test picks between two equal formulas for the squared norm (as factors.py:180:26)",
    "aam_func/per_sample/factors.py:182:39:Mult->Div#2":
        "as factors.py:182:39",
    "aam_func/per_sample/factors.py:182:39:Gt->GtE":
        "as factors.py:182:39",
    "aam_func/per_sample/factors.py:182:50:Add->Sub":
        "as factors.py:182:39",
    "aam_func/per_sample/factors.py:182:70:Mult->Div":
        "as factors.py:182:39",
    "aam_func/per_sample/factors.py:182:70:Mult->Div#2":
        "as factors.py:182:39",
    "aam_func/per_sample/route.py:115:70:False->True":
        "want_sum only adds the clipped sum, which norms() throws away",
    "aam_func/per_sample/exact_ops.py:85:33:False->True":
        "F.batch_norm passes every argument, training included, to __torch_function__, so bound always has training and the default is never read",
    "aam_func/per_sample/dp.py:89:93:1->2":
        "the seed mask 2^64-1 vs 2^63-2 still gives one fixed seed per (seed, count): only the noise stream moves, which no contract fixes (as dp.py:46)",
    "aam_func/per_sample/dp.py:89:98:63->64":
        "as dp.py:89:93",
    "aam_func/per_sample/dp.py:89:104:1->2":
        "as dp.py:89:93",
    "aam_func/per_sample/clipping.py:167:80:1->2":
        "as dp.py:89:93 (the clipping noise's seed)",
    "aam_func/per_sample/clipping.py:167:85:63->64":
        "as dp.py:89:93",
    "aam_func/per_sample/clipping.py:167:91:1->2":
        "as dp.py:89:93",
    "aam_func/per_sample/clipping.py:138:94:Gt->GtE":
        "at count_noise = 0 the mutant adds randn * 0, the same values; only the generator advances (as dp.py:46)",
    "aam_func/ops/cross_entropy.py:327:50:0->1":
        "hidden, weight and bias share one dtype (_check), so dtypes[0] and dtypes[1] name the same dtype; without a bias .to(None) keeps the dtype, and autograd casts every gradient to its input's dtype",
    "aam_func/ops/cross_entropy.py:328:50:1->2":
        "as cross_entropy.py:327:50",
    "aam_func/ops/cross_entropy.py:333:26:0->1":
        "as cross_entropy.py:327:50, on the double-backward path",
    "aam_func/ops/cross_entropy.py:334:26:1->2":
        "as cross_entropy.py:327:50, on the double-backward path",
    "aam_func/ops/remat.py:252:77:3->4":
        "the registry sample's dict entry 'n' is never read (only 'y' is)",
    "aam_func/ops/remat.py:252:67:drop USub":
        "the registry sample's x is 2-d, so sum(-1) and sum(1) agree",
    "aam_func/ops/remat.py:256:32:drop USub":
        "as remat.py:252:67, in the sample's reference",
    "aam_func/losses.py:245:75:1->2":
        "every positive pair lies in one class and all anchors of a class have the same number of positives, so summing the masked log-probabilities by column only reorders the terms of the final scalar: equal up to floating-point summation order, which no contract fixes",
    "aam_func/ops/cross_entropy.py:113:16:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:126:37:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:126:50:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:210:16:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:213:44:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:215:15:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:217:18:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:356:39:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/ops/cross_entropy.py:471:60:drop USub":
        "the tensor is always 2-d (n, V), also under vmap (which hides the batch dim), so -1 and 1 name the same dimension",
    "aam_func/losses.py:244:20:drop USub":
        "pos is the (n, n) positives mask, so sum(-1) and sum(1) are the same reduction",
    "aam_func/losses.py:245:74:drop USub":
        "as losses.py:244:20: the masked log-probabilities are (n, n)",
    "aam_func/per_sample/batched.py:168:44:drop USub":
        "torch.addmm's mat1 is 2-d, so shape[1] == shape[-1]",
    "aam_func/per_sample/batched.py:168:75:drop USub":
        "as batched.py:168:44, for addmm's 2-d output",
}
