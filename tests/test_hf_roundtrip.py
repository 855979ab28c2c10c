"""The slow round trips: a LLaMA with a sentencepiece tokenizer through train / export / generate /
eval and transformers' pipeline, and LoRA runs of GPT-2 and LLaMA exported as PEFT adapters that
``PeftModel.from_pretrained`` loads on the original model."""

import json

import pytest
import torch
from _hf_tiny import gpt2_dir, held_out_blocks, llama_dir, qwen2_dir, write_corpus

import aam_func as af
from aam_func import cli
from aam_func.checkpoint import load_checkpoint
from aam_func.run import evaluate_checkpoint

pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.slow

TRAIN = ["--steps", "3", "--batch-size", "4", "--seq-len", "64", "--precision", "fp32", "--eval-every", "0",
         "--eval-batches", "1", "--sample-tokens", "0", "--lr", "1e-2"]
SOURCES = {"gpt2": gpt2_dir, "llama": llama_dir, "qwen2": qwen2_dir}


def test_llama_with_a_sentencepiece_tokenizer_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    src = llama_dir(tmp_path / "llama")
    train, held = write_corpus(tmp_path)
    run, out = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["train", "--init-from", src, "--data", train, "--output-dir", str(run), *TRAIN]) == 0
    assert cli.main(["export", "--checkpoint", str(run), "--format", "transformers", "--output", str(out)]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The with statement"}) + "\n" + json.dumps({"prompt": "Classes"}) + "\n")
    results = tmp_path / "gen.jsonl"
    assert cli.main(["generate", "--checkpoint", str(run), "--prompts-file", str(prompts), "--greedy",
                     "--max-new-tokens", "128", "--output", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]

    hf, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert hf.config.bos_token_id == 1 and hf.generation_config.eos_token_id == 2
    pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    lengths = []
    for r in rows:
        enc = tok(r["prompt"], return_tensors="pt")
        assert r["prompt_ids"][0] == tok.bos_token_id and enc.input_ids[0].tolist() == r["prompt_ids"]
        g = hf.generate(**enc, max_new_tokens=128, do_sample=False)
        assert g[0, enc.input_ids.shape[1]:].tolist() == r["completion_ids"]
        lengths.append(len(r["completion_ids"]))
        text = pipe(r["prompt"], max_new_tokens=128, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert text == tok.decode(g[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert max(lengths) == 128

    ev = evaluate_checkpoint(str(run), data=held, seq_len=64, batch_size=4)
    blocks = held_out_blocks(tok, held, 64)
    assert blocks.shape[0] == ev["blocks"] >= 2
    with torch.no_grad():
        assert abs(hf(blocks, labels=blocks).loss.item() - ev["loss"]) <= 1e-4


@pytest.mark.parametrize("arch", sorted(SOURCES))
def test_lora_run_exports_peft_adapters_for_the_original_model(tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = SOURCES[arch](tmp_path / arch)
    train, _ = write_corpus(tmp_path)
    run, out = tmp_path / "run", tmp_path / "adapter"
    assert cli.main(["train", "--init-from", src, "--data", train, "--output-dir", str(run), *TRAIN,
                     "--lora-rank", "4", "--lora-targets", "*.attn.qkv,*.attn.out,*.mlp.*"]) == 0
    assert cli.main(["export", "--checkpoint", str(run), "--format", "peft", "--output", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == src and config["r"] == 4

    base = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        theirs = peft_model(ids).logits
    ckpt = load_checkpoint(str(run), load_optimizer=False)  # the merged weights W + s·B·A
    ours = af.Transformer(ckpt.cfg).apply(ckpt.params, ids)["logits"]
    assert (theirs - before).abs().max() > 1e-3  # the adapters are trained, not the zero B they start from
    assert (ours - theirs).abs().max() <= 1e-5
