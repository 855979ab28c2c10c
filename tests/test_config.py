import pytest

from aam_func import ModelConfig


def test_guide_config_builds_and_maps_flags():
    c = ModelConfig(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512, dropout=0.1,
        activation="gelu", use_relative_pos=True, use_rope=False, use_flash_attention=False, use_xformers=False,
        gradient_checkpointing=True, mixed_precision=True, weight_decay=0.01, learning_rate=1e-4,
        warmup_steps=1000, max_grad_norm=1.0, label_smoothing=0.1,
    )
    assert c.attention_type == "relative" and c.position_encoding == "sinusoidal"
    assert c.attention_backend == "auto" and c.n_kv_heads == 12 and c.head_dim == 64
    assert ModelConfig(use_rope=True).position_encoding == "rope"
    assert ModelConfig(use_flash_attention=True).attention_backend == "blockwise"
    assert ModelConfig(use_xformers=True).attention_backend == "xformers"


def test_guide_test_configs_are_valid():
    assert ModelConfig(vocab_size=100, d_model=64).d_ff == 256
    assert ModelConfig(vocab_size=50, d_model=32).head_dim == 4


def test_swiglu_default_hidden():
    assert ModelConfig(d_model=96, n_heads=4, activation="swiglu").d_ff == 256


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=-1), "d_model"),
        (dict(n_layers=1.5), "n_layers"),
        (dict(d_model=30, n_heads=4), "d_model=30"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3"),
        (dict(d_model=24, n_heads=8, use_rope=True), "even head dim"),
        (dict(dropout=1.0), "dropout"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(attention_dropout=2.0), "attention_dropout"),
        (dict(activation="tanh"), "activation"),
        (dict(norm="batchnorm"), "norm"),
        (dict(attention_type="global"), "attention_type"),
        (dict(attention_backend="cuda"), "attention_backend"),
        (dict(position_encoding="alibi"), "position_encoding"),
        (dict(use_rope=True, position_encoding="learnable"), "use_rope=True conflicts"),
        (dict(use_relative_pos=True, attention_type="local"), "use_relative_pos=True conflicts"),
        (dict(use_flash_attention=True, use_xformers=True), "choose one"),
        (dict(use_xformers=True, attention_backend="math"), "use_xformers=True conflicts"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(focal_loss_gamma=-2.0), "focal_loss_gamma"),
        (dict(focal_loss_alpha=0.0), "focal_loss_alpha"),
        (dict(max_relative_position=0), "max_relative_position"),
        (dict(weight_init="orthogonal"), "weight_init"),
    ],
)
def test_invalid_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_frozen_replace_and_json_roundtrip(tmp_path):
    c = ModelConfig(vocab_size=10, d_model=16, n_heads=2)
    with pytest.raises(Exception):
        c.d_model = 32
    d = c.replace(n_layers=3)
    assert d.n_layers == 3 and c.n_layers == 6
    with pytest.raises(ValueError, match="n_heads"):
        c.replace(n_heads=3)
    path = tmp_path / "config.json"
    c.save(path)
    assert ModelConfig.load(path) == c
    with pytest.raises(ValueError, match="unknown ModelConfig fields: bogus"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_extra_is_not_a_field_and_old_files_still_load():
    # ``extra`` was accepted and ignored; now it is refused, while configs saved with the old
    # empty ``"extra": {}`` entry still load
    with pytest.raises(TypeError, match="extra"):
        ModelConfig(extra={"x": 1})
    d = ModelConfig(d_model=32, n_heads=4).to_dict()
    assert "extra" not in d
    assert ModelConfig.from_dict({**d, "extra": {}}) == ModelConfig(d_model=32, n_heads=4)
    with pytest.raises(ValueError, match="unknown ModelConfig fields: extra"):
        ModelConfig.from_dict({**d, "extra": {"x": 1}})


def test_attention_backends_and_weight_inits_have_one_owner():
    from aam_func import config, init
    from aam_func.ops import attention

    assert config.ATTENTION_BACKENDS is attention.BACKENDS
    assert config.WEIGHT_INITS is init.WEIGHT_INITS


def test_config_name_tuples_are_their_owners():
    """Each tuple of names a config field accepts is owned by the code that dispatches on it;
    config re-exports the same object (losses re-exports cross_entropy's reductions likewise)."""
    from aam_func import config, losses
    from aam_func.layers import attention, basic, mlp
    from aam_func.ops import cross_entropy, rope
    from aam_func.ops.attention import masks

    assert config.ACTIVATIONS is mlp.ACTIVATIONS
    assert config.NORMS is basic.NORMS
    assert config.ATTENTION_TYPES is attention.ATTENTION_TYPES
    assert config.ROPE_LAYOUTS is rope.LAYOUTS
    assert config.SPARSE_PATTERNS is masks.SPARSE_PATTERNS
    assert losses.REDUCTIONS is cross_entropy.REDUCTIONS
