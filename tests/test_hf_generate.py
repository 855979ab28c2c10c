"""``aam-func generate`` with a transformers model's tokenizer: ``--chat`` (its chat template),
prompts from a file (lines or JSON lines), batched, results as JSON lines; and the refusals."""

import json

import pytest
from _hf_tiny import bpe_tokenizer, gpt2_model, save

from aam_func import cli
from aam_func.checkpoint import save_checkpoint
from aam_func.interop.pretrained import load_pretrained_model
from aam_func.tokenizer import Tokenizer

PROMPTS = ["The with statement", "Classes provide a means of bundling data", "x"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two aam-func checkpoints of one tiny GPT-2: its tokenizer with a chat template, and without."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, chat in (("chat", True), ("plain", False)):
        src = save(gpt2_model(400), bpe_tokenizer(400, chat_template=chat), root / f"{name}-src")
        ckpt = load_pretrained_model(src)
        out[name] = save_checkpoint(root / name, cfg=ckpt.cfg, params=ckpt.params, step=0,
                                    tokenizer=Tokenizer.load(src))
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gen(ckpt, *args):
    return ["generate", "--checkpoint", ckpt, "--greedy", "--max-new-tokens", "12", *args]


def test_prompts_file_lines_and_jsonl_batched_as_one_by_one(checkpoints, tmp_path, capsys):
    lines, jl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    lines.write_text("\n".join(PROMPTS) + "\n\n")
    jl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]) + json.dumps(PROMPTS[2]) + "\n")
    outs = []
    for source, batch in ((lines, "3"), (jl, "2"), (lines, "1")):
        out = tmp_path / f"out-{len(outs)}.jsonl"
        assert cli.main(_gen(checkpoints["plain"], "--prompts-file", str(source), "--batch-size", batch,
                             "--output", str(out))) == 0
        outs.append(_rows(out))
    assert [r["prompt"] for r in outs[0]] == PROMPTS
    assert outs[0] == outs[1] == outs[2]  # left padding in a batch changes nothing
    assert all(len(r["completion_ids"]) == 12 for r in outs[0])
    capsys.readouterr()
    assert cli.main(_gen(checkpoints["plain"], "--prompts-file", str(lines))) == 0  # no --output: JSON lines on stdout
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == outs[0]


def test_chat_wraps_the_prompt_in_the_template(checkpoints, tmp_path):
    tok = Tokenizer.load(checkpoints["chat"] + "/tokenizer").hf
    out = tmp_path / "chat.jsonl"
    assert cli.main(_gen(checkpoints["chat"], "--chat", "--prompt", "hello", "--output", str(out))) == 0
    (row,) = _rows(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>hello\n<|assistant|>"
    assert row["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"] != tok("hello")["input_ids"]


def _error(capsys, argv, match):
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_generate_refusals(checkpoints, tmp_path, capsys):
    plain = checkpoints["plain"]
    _error(capsys, _gen(plain, "--chat", "--prompt", "hi"), "--chat needs a tokenizer with a chat template")
    _error(capsys, _gen(plain), "give the prompts with --prompt")
    f = tmp_path / "p.jsonl"
    f.write_text("hello\n")
    _error(capsys, _gen(plain, "--prompt", "a", "--prompts-file", str(f)), "not both")
    _error(capsys, _gen(plain, "--prompts-file", str(f)), "line 1: not JSON")
    f.write_text('{"text": "hi"}\n')
    _error(capsys, _gen(plain, "--prompts-file", str(f)), "string 'prompt' field")
    f.write_text("\n\n")
    _error(capsys, _gen(plain, "--prompts-file", str(f)), "holds no prompt")
    _error(capsys, _gen(plain, "--prompts-file", str(tmp_path / "missing.txt")), "missing.txt")
    _error(capsys, _gen(plain, "--prompt", "hi", "--max-new-tokens", "300"), "maximum sequence length 256")
