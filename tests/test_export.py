"""``aam-func export --format safetensors`` (any architecture, our names, the config in the
metadata) and the refusals of the transformers format for a model it has no equivalent of."""

import pytest
import torch
from _hf_tiny import bpe_tokenizer

import aam_func as af
from aam_func import cli, tree
from aam_func.checkpoint import save_checkpoint
from aam_func.interop.export import ExportError, export_checkpoint, read_safetensors
from aam_func.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def sinusoidal(tmp_path_factory):
    """A checkpoint of a model transformers has no class for (sinusoidal positions)."""
    root = tmp_path_factory.mktemp("export")
    tok = Tokenizer(bpe_tokenizer(300))
    cfg = af.ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, dropout=0.0,
                         position_encoding="sinusoidal")
    params = af.Transformer(cfg).init(seed=0)
    return save_checkpoint(root / "ckpt", cfg=cfg, params=params, step=7, tokenizer=tok), cfg, params


def test_safetensors_holds_the_params_and_config(sinusoidal, tmp_path, capsys):
    path, cfg, params = sinusoidal
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", "--checkpoint", path, "--format", "safetensors", "--output", str(out)]) == 0
    assert f"exported safetensors: {out}" in capsys.readouterr().out
    cfg2, params2 = read_safetensors(str(out))
    assert cfg2 == cfg
    flat, flat2 = tree.flatten(params), tree.flatten(params2)
    assert flat.keys() == flat2.keys() and all(torch.equal(flat[k], flat2[k]) for k in flat)


def test_transformers_format_refuses_a_model_without_equivalent(sinusoidal, tmp_path, capsys):
    path, _, _ = sinusoidal
    assert cli.main(["export", "--checkpoint", path, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "no transformers equivalent" in err and "--format safetensors" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises(ExportError, match="format must be one of transformers, peft, safetensors"):
        export_checkpoint(path, str(tmp_path / "x"), "onnx")
    tree.save({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ExportError, match="not an aam_func params file"):
        read_safetensors(str(tmp_path / "plain.safetensors"))
