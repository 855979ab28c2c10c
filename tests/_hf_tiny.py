"""Tiny transformers models saved with ``save_pretrained``, with tokenizers trained here (no
download): what the tests of ``--init-from`` a transformers model and ``aam-func export`` start from."""

from __future__ import annotations

import json
import os

import torch
from pydoc_data.topics import topics

TEXTS = [v for _, v in sorted(topics.items())]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_corpus(tmp_path) -> tuple[str, str]:
    """(training .jsonl, held-out .jsonl) of documents from Python's reference text."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:12]))
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[-4:]))
    return str(train), str(held)


def bpe_tokenizer(vocab_size: int = 400, chat_template: bool = False):
    """A byte-level BPE (a transformers fast tokenizer) trained on the reference text."""
    from aam_func.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(TEXTS[:30], vocab_size=vocab_size).hf
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def spm_llama_tokenizer(workdir, vocab_size: int = 400):
    """A sentencepiece BPE model read by transformers' LlamaTokenizer from ``tokenizer.model``
    (bos ``<s>`` added to each text, eos ``</s>``, byte fallback), as LLaMA checkpoints ship it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, "spm.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(" ".join(t.split()) for t in TEXTS[:60]))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(workdir, "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   character_coverage=0.9995, minloglevel=2)
    with open(os.path.join(workdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, f)
    return AutoTokenizer.from_pretrained(workdir, local_files_only=True)


def gpt2_model(vocab_size: int, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=None,
             eos_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**c)).eval()


def llama_model(vocab_size: int, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**c)).eval()
    with torch.no_grad():  # norms start at 1: perturb them so that their mapping is checked
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def qwen2_model(vocab_size: int, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**c)).eval()
    with torch.no_grad():  # q/k/v biases start at 0: perturb them so that their mapping is checked
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def save(model, tok, directory) -> str:
    from aam_func.interop.pretrained import quiet_transformers

    directory = str(directory)
    with quiet_transformers():
        model.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return directory


def gpt2_dir(directory, **kw) -> str:
    tok = bpe_tokenizer(chat_template=True)
    return save(gpt2_model(len(tok), **kw), tok, directory)


def qwen2_dir(directory) -> str:
    tok = bpe_tokenizer(chat_template=True)
    return save(qwen2_model(len(tok)), tok, directory)


def llama_dir(directory) -> str:
    tok = spm_llama_tokenizer(os.path.join(str(directory) + "-spm"))
    return save(llama_model(len(tok)), tok, directory)


def fake_hub_cache(hf_home, name: str, source_dir: str, rev: str = "0123abc") -> str:
    """``source_dir``'s files laid out as the hub cache keeps a downloaded ``name``:
    ``hub/models--org--name/{refs/main, snapshots/<rev>/...}``; returns the snapshot."""
    import shutil

    repo = os.path.join(str(hf_home), "hub", "models--" + name.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", rev)
    shutil.copytree(source_dir, snap)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(rev)
    return snap


def held_out_blocks(tokenizer, held_jsonl: str, seq_len: int) -> torch.Tensor:
    """The held-out documents as transformers' tokenizer encodes them, eos after each, cut into
    blocks of ``seq_len`` (the tail dropped): what ``aam-func eval --data`` reads, built here
    independently."""
    stream = []
    with open(held_jsonl, encoding="utf-8") as f:
        for line in f:
            stream += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)
