"""``aam-func train --init-from`` a transformers model (a save_pretrained directory, or a name in
the local Hugging Face cache, offline), ``aam-func export`` back to transformers, and the errors:
a fast GPT-2 round trip through the command line and every refusal (one line, exit status 2)."""

import json
import re

import pytest
import torch
from _hf_tiny import bpe_tokenizer, fake_hub_cache, gpt2_dir, gpt2_model, held_out_blocks, save, write_corpus

from aam_func import cli
from aam_func.run import evaluate_checkpoint

TRAIN = ["--steps", "3", "--batch-size", "4", "--seq-len", "64", "--precision", "fp32", "--eval-every", "0",
         "--sample-tokens", "0", "--lr", "1e-2", "--eval-batches", "1"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face home whose cache holds one tiny GPT-2, ``tiny-org/gpt2-mini``."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = gpt2_dir(tmp_path / "gpt2-src")
    fake_hub_cache(home, "tiny-org/gpt2-mini", src)
    return src


def _error(capsys, argv, match):
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_gpt2_from_the_hub_cache_round_trips_through_the_cli(tmp_path, hub, capsys):
    """cached name -> train -> export -> transformers generates the same 128 greedy tokens as
    aam-func generate, and its held-out loss is aam-func eval's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held = write_corpus(tmp_path)
    run, out = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["train", "--init-from", "tiny-org/gpt2-mini", "--data", train, "--output-dir", str(run),
                     *TRAIN]) == 0
    assert "initialised from" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(run), "--output", str(out)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The with statement\nClasses provide a means\n")
    results = tmp_path / "gen.jsonl"
    assert cli.main(["generate", "--checkpoint", str(run), "--prompts-file", str(prompts), "--greedy",
                     "--max-new-tokens", "128", "--output", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The with statement", "Classes provide a means"]

    hf, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(hub)
    assert not torch.equal(hf.transformer.h[0].attn.c_attn.weight, source.transformer.h[0].attn.c_attn.weight)
    lengths = []
    for r in rows:  # aam-func generated them in one left-padded batch; transformers one by one
        enc = tok(r["prompt"], return_tensors="pt")
        assert enc.input_ids[0].tolist() == r["prompt_ids"]
        g = hf.generate(**enc, max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id)
        assert g[0, enc.input_ids.shape[1]:].tolist() == r["completion_ids"]
        lengths.append(len(r["completion_ids"]))
    assert max(lengths) == 128

    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--data", held, "--seq-len", "64", "--batch-size", "4"]) == 0
    printed = float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1))
    ev = evaluate_checkpoint(str(run), data=held, seq_len=64, batch_size=4)
    blocks = held_out_blocks(tok, held, 64)
    assert blocks.shape[0] == ev["blocks"] >= 2
    with torch.no_grad():
        theirs = hf(blocks, labels=blocks).loss.item()
    assert abs(theirs - ev["loss"]) <= 1e-4 and abs(theirs - printed) <= 1e-4


def test_init_from_refusals(tmp_path, hub, capsys, monkeypatch):
    train, _ = write_corpus(tmp_path)
    t = ["train", "--data", train, "--output-dir", str(tmp_path / "run"), *TRAIN]
    (tmp_path / "empty").mkdir()
    _error(capsys, [*t, "--init-from", str(tmp_path / "empty")], "holds no config.json")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    err = _error(capsys, [*t, "--init-from", str(bert)], "unsupported architecture model_type='bert'")
    assert "supported: GPT-2" in err and "LLaMA" in err and "Mistral" in err
    err = _error(capsys, [*t, "--init-from", "tiny-org/absent"], "not in the local Hugging Face cache")
    assert "cached models: tiny-org/gpt2-mini" in err
    tok = bpe_tokenizer(vocab_size=400)
    small = save(gpt2_model(300), tok, tmp_path / "small-embedding")
    _error(capsys, [*t, "--init-from", small], "the tokenizer has 400 tokens but the model embeds only 300")
    for flags in (["--d-model", "64"], ["--vocab-size", "512"], ["--tokenizer", hub]):
        _error(capsys, [*t, "--init-from", hub, *flags], "cannot be combined with --init-from")
    no_tok = save(gpt2_model(400), None, tmp_path / "no-tokenizer")
    _error(capsys, [*t, "--init-from", no_tok], "the model's tokenizer")
    gpt2_dir(tmp_path / "scaled", scale_attn_by_inverse_layer_idx=True)
    _error(capsys, [*t, "--init-from", str(tmp_path / "scaled")], "scale_attn_by_inverse_layer_idx")


def test_cached_snapshot_is_the_one_refs_main_names(tmp_path, hub):
    from aam_func.interop.pretrained import cached_models, resolve_model_dir

    home = tmp_path / "hf-home"
    newer = fake_hub_cache(home, "solo", hub, rev="bbb")
    assert resolve_model_dir("tiny-org/gpt2-mini").endswith("models--tiny-org--gpt2-mini/snapshots/0123abc")
    assert resolve_model_dir("solo") == newer
    assert cached_models() == ["solo", "tiny-org/gpt2-mini"]


def test_export_refusals(tmp_path, hub, capsys):
    train, _ = write_corpus(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--init-from", hub, "--data", train, "--output-dir", str(run), *TRAIN]) == 0
    out = tmp_path / "out"
    out.mkdir()
    _error(capsys, ["export", "--checkpoint", str(run), "--output", str(out)], "already exists; pass --overwrite")
    _error(capsys, ["export", "--checkpoint", str(run), "--format", "peft", "--output", str(tmp_path / "p")],
           "is not from a LoRA run")
    _error(capsys, ["export", "--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "q")],
           "no checkpoint at")
    assert cli.main(["export", "--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob("out.tmp-*"))
