"""Document masking for packed blocks (issue 20): document ids from eos, positions that restart
per document, one block mask for all layers, the cross-document target out of the loss, and
the loader, config and CLI that switch it on."""

from __future__ import annotations

import pytest
import torch

import aam_func as af
from aam_func.data.loading import BlockLoader, eval_batches
from aam_func.losses import mask_document_starts
from aam_func.ops.attention import mods
from aam_func.run.config import RunConfig

EOS = 0
DOCS = (torch.tensor([5, 6, 7, EOS]), torch.tensor([8, 9, 10, 11, 12, EOS]), torch.tensor([13, 14, 15]))


def _model(**kw):
    cfg = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0, document_mask=True,
               eos_token_id=EOS)
    cfg.update(kw)
    m = af.Transformer(af.ModelConfig(**cfg))
    return m, m.init(seed=0)


def test_document_ids_and_positions_restart_after_each_eos():
    ids = torch.cat(DOCS)[None]
    doc = mods.document_ids(ids, EOS)
    assert doc.tolist() == [[0] * 4 + [1] * 6 + [2] * 3]
    assert mods.document_positions(doc).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert mods.document_positions(torch.tensor([[3, 3, 1, 1, 1]])).tolist() == [[0, 1, 0, 1, 2]]


@pytest.mark.parametrize("pe", ["learnable", "rope", "sinusoidal"])
@pytest.mark.parametrize("backend", ["auto", "math", "blockwise"])
def test_packed_block_logits_equal_each_document_alone(pe, backend):
    m, p = _model(position_encoding=pe, attention_backend=backend)
    packed = m.apply(p, torch.cat(DOCS)[None])["logits"]
    start = 0
    for d in DOCS:
        alone = m.apply(p, d[None])["logits"]
        torch.testing.assert_close(packed[:, start:start + len(d)], alone, atol=1e-5, rtol=0)
        start += len(d)
    # and without document masking the later documents do read the earlier ones
    m0, _ = _model(position_encoding=pe, attention_backend=backend, document_mask=False)
    assert not torch.allclose(m0.apply(p, torch.cat(DOCS)[None])["logits"][:, 4:10], packed[:, 4:10], atol=1e-3)


def test_loss_ignores_the_cross_document_target_at_each_boundary():
    m, p = _model()
    ids = torch.cat(DOCS)[None]
    loss = m.apply(p, ids, labels=ids)["loss"]
    # the same as the token-weighted mean of each document's own loss: the eos that ends a
    # document predicts nothing (its target, the next document's first token, is ignored)
    total, n = 0.0, 0
    for d in DOCS:
        total = total + m.apply(p, d[None], labels=d[None])["loss"] * (len(d) - 1)
        n += len(d) - 1
    torch.testing.assert_close(loss, total / n)
    assert mask_document_starts(ids, mods.document_ids(ids, EOS)).tolist() == [
        [5, 6, 7, 0, -100, 9, 10, 11, 12, 0, -100, 14, 15]]


def test_explicit_document_ids_and_explicit_positions():
    m, p = _model(document_mask=False, eos_token_id=None)
    ids = torch.cat(DOCS)[None]
    doc = mods.document_ids(ids, EOS)
    m1, _ = _model()
    torch.testing.assert_close(m.apply(p, ids, document_ids=doc)["logits"], m1.apply(p, ids)["logits"])
    with pytest.raises(ValueError, match=r"document_ids must have shape \(batch, seq\) = \(1, 13\)"):
        m.apply(p, ids, document_ids=doc[:, :5])
    with pytest.raises(TypeError, match="document_ids must be an integer tensor"):
        m.apply(p, ids, document_ids=doc.float())


def _loss(model):
    return lambda params, x: model.apply(params, x, labels=x)["loss"]


def test_gradient_checkpointing_with_document_masking():
    m, p = _model(n_layers=1)
    mc, _ = _model(n_layers=1, gradient_checkpointing=True)
    ids = torch.cat(DOCS)[None].repeat(2, 1)
    g = torch.func.grad(_loss(m))(p, ids)
    gc = torch.func.grad(_loss(mc))(p, ids)
    for k in ("embed", "ln_f"):
        torch.testing.assert_close(g[k]["weight"], gc[k]["weight"])


def test_per_sample_grads_with_document_masking():
    """Under vmap the document ids are batched: the block mask marks every tile partial."""
    m, p = _model(n_layers=1)
    ids = torch.cat(DOCS)[None].repeat(2, 1)
    loss = _loss
    per = af.per_sample.grads(lambda params, b: loss(m)(params, b["input_ids"]), p, {"input_ids": ids})
    torch.testing.assert_close(per["embed"]["weight"][0], torch.func.grad(loss(m))(p, ids[:1])["embed"]["weight"])


def test_loader_and_eval_batches_emit_document_ids():
    blocks = torch.cat(DOCS)[:12].view(3, 4)
    b = BlockLoader(blocks, 3, shuffle=False, eos_id=EOS).batch(0)
    assert torch.equal(b["document_ids"], mods.document_ids(b["input_ids"], EOS))
    assert "document_ids" not in BlockLoader(blocks, 3).batch(0)
    (e,) = list(eval_batches(blocks, 3, eos_id=EOS))
    assert e["document_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    # the train loss passes them to the model
    m, p = _model(document_mask=False, eos_token_id=None)
    m1, _ = _model()
    loss = af.train.make_lm_loss(m, train=False)
    batch = {"input_ids": torch.cat(DOCS)[None], "document_ids": mods.document_ids(torch.cat(DOCS)[None], EOS)}
    torch.testing.assert_close(loss(p, batch), af.train.make_lm_loss(m1, train=False)(p, {"input_ids": batch["input_ids"]}))


def test_config_and_flag():
    with pytest.raises(ValueError, match="document_mask"):
        af.ModelConfig(document_mask=1)
    with pytest.raises(ValueError, match="document_mask=True needs attention_backend"):
        af.ModelConfig(document_mask=True, attention_backend="sdpa")
    with pytest.raises(ValueError, match="eos_token_id"):
        af.ModelConfig(vocab_size=10, eos_token_id=10)
    with pytest.raises(ValueError, match="document_mask must be a bool"):
        RunConfig(document_mask="yes")
    cfg = af.ModelConfig(document_mask=True, eos_token_id=3)
    assert af.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert af.ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                     if k not in ("document_mask", "eos_token_id")}).document_mask is False
    from aam_func.cli import build_parser  # noqa: PLC0415
    args = build_parser().parse_args(["train", "--document-mask"])
    assert args.document_mask is True


# ------------------------------------------------------- the run's default (on for new runs)


def test_new_runs_mask_documents_by_default_and_resumes_keep_the_runs_setting():
    from types import SimpleNamespace

    from aam_func.run import RunError
    from aam_func.run.config import document_mask_on

    assert RunConfig().document_mask is True
    assert document_mask_on(RunConfig(), "auto") and document_mask_on(RunConfig(), "math")
    assert not document_mask_on(RunConfig(attention_backend="sdpa"), "sdpa")  # the default yields to the backend
    given = RunConfig.from_flags({"document_mask": True, "attention_backend": "sdpa"}, {"document_mask", "attention_backend"})
    assert document_mask_on(given, "sdpa")  # asked for: honoured (and the model config refuses it by name)
    assert not document_mask_on(RunConfig(document_mask=False), "auto")

    def ckpt(recorded):
        return SimpleNamespace(train_state={"args": {}}, step=1, path="ck", cfg=af.ModelConfig(document_mask=recorded))

    assert RunConfig(resume="", steps=5).for_resume(ckpt(False)).document_mask is False  # a run from before: off
    assert RunConfig(resume="", steps=5).for_resume(ckpt(True)).document_mask is True
    off = RunConfig.from_flags({"resume": "", "steps": 5, "document_mask": False}, {"resume", "steps", "document_mask"})
    with pytest.raises(RunError, match="--no-document-mask would change it"):
        off.for_resume(ckpt(True))
    with pytest.raises(ValueError, match="document_mask=True needs attention_backend"):
        af.ModelConfig(document_mask=True, attention_backend="triton")


TINY_RUN = dict(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=4, vocab_size=300, sample_tokens=0,
                precision="fp32", eval_every=0, steps=4)


@pytest.mark.slow  # two tiny runs and a resume: ~17 s wall on the shared machine
@pytest.mark.usefixtures("one_thread")
def test_a_run_without_document_masking_resumes_without_it_bitwise(tmp_path, corpus):
    """A run made with the mask off (as every run was before the default changed) goes on with
    it off when resumed under the new default, and ends bit for bit where the uninterrupted run does."""
    from safetensors.torch import load_file

    from aam_func import run

    quiet = [].append
    off = dict(TINY_RUN, data=str(corpus), document_mask=False)
    full = run.prepare(RunConfig(**off, output_dir=str(tmp_path / "full")), "cpu", log=quiet)
    assert full.model_config.document_mask is False
    run.loop(full)
    run.loop(run.prepare(RunConfig(**off, output_dir=str(tmp_path / "split"), stop_after=2), "cpu", log=quiet))
    new_default = {k: v for k, v in off.items() if k != "document_mask"}
    resumed = run.prepare(RunConfig(**new_default, output_dir=str(tmp_path / "split"), resume=""), "cpu", log=quiet)
    assert resumed.start == 2 and resumed.model_config.document_mask is False
    assert resumed.config.document_mask is False
    run.loop(resumed)
    a, b = (load_file(tmp_path / d / "checkpoint" / "params.safetensors") for d in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and a new run under the default masks documents
    new = run.prepare(RunConfig(**new_default, output_dir=str(tmp_path / "new")), "cpu", log=quiet)
    assert new.model_config.document_mask is True and new.model_config.eos_token_id is not None
