"""Tokenizers: transformers' ``AutoTokenizer``, offline, or a byte-level BPE trained on the corpus.

    tok = Tokenizer.load("path/to/tokenizer_dir")             # or a model name already in the HF cache
    tok = Tokenizer.train_bpe(texts, vocab_size=8192)         # byte-level BPE, no download
    tok.save("run/tokenizer")                                 # an ordinary transformers tokenizer dir
    batch = tok(["a text", "another"], max_length=128)        # {"input_ids", "attention_mask"} (batch, seq)
    tok.decode(batch["input_ids"])                            # list of strings

Nothing is ever downloaded and ``trust_remote_code`` is never set: a name that is not in the
local cache is a :class:`TokenizerError` that says how to point at a local directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .checks import check_int

__all__ = ["Tokenizer", "TokenizerError", "EOS_TOKEN", "LazyTokenizer"]

EOS_TOKEN = "<|endoftext|>"
# the longest run of non-space characters the trained BPE sees as one word (see Tokenizer.train_bpe)
MAX_WORD = 256


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or used as asked (the CLI prints it without a traceback)."""


class Tokenizer:
    """A thin wrapper over a ``transformers.PreTrainedTokenizerFast`` with the guide's options.

    ``padding``: ``"longest"`` (pad to the longest text in the batch), ``"max_length"`` or
    ``False``; ``truncation`` cuts each text to ``max_length`` tokens; ``padding_side`` is
    ``"right"`` for training and ``"left"`` for batched generation.
    """

    def __init__(self, hf_tokenizer, *, max_length: Optional[int] = None, padding: Union[str, bool] = "longest",
                 truncation: bool = True, padding_side: str = "right"):
        self.hf = hf_tokenizer
        if self.hf.eos_token is None:
            raise TokenizerError("the tokenizer has no eos token; a language-model tokenizer needs one")
        if self.hf.pad_token is None:  # GPT-2 style: pad with eos (padding is masked anyway)
            self.hf.pad_token = self.hf.eos_token
        if padding not in ("longest", "max_length", True, False):
            raise TokenizerError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.max_length = max_length
        self.padding = "longest" if padding is True else padding
        self.truncation = truncation
        self.padding_side = padding_side

    # ----------------------------------------------------------------- building
    @classmethod
    def load(cls, name_or_dir: str | os.PathLike, **options) -> "Tokenizer":
        """A local tokenizer directory, or a model name already in the Hugging Face cache (offline)."""
        from transformers import AutoTokenizer

        name = os.fspath(name_or_dir)
        is_dir = os.path.isdir(name)
        if not is_dir and (os.sep in name or name.startswith(".")) and not _looks_like_hub_name(name):
            raise TokenizerError(f"tokenizer directory {name!r} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
            if is_dir:
                raise TokenizerError(f"cannot load a tokenizer from directory {name!r}: {_first_line(e)}") from None
            raise TokenizerError(
                f"tokenizer {name!r} is not available offline (nothing is downloaded). Point at a local "
                "tokenizer directory instead (one that holds tokenizer.json or vocab files, e.g. made by "
                "`tokenizer.save_pretrained(dir)`), or omit the tokenizer to train a byte-level BPE on the corpus"
            ) from None
        return cls(hf, **options)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
                  save_dir: str | os.PathLike | None = None, **options) -> "Tokenizer":
        """Train a GPT-2-style byte-level BPE on ``texts`` (no unknown tokens: every byte is in the
        vocabulary) with one special token, ``<|endoftext|>`` (eos, bos and pad)."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        try:
            check_int("vocab_size", vocab_size, min=257)
        except ValueError as e:  # the CLI reports TokenizerError without a traceback
            raise TokenizerError(f"{e} (256 bytes + eos)") from None
        raw = RawTokenizer(models.BPE())
        # a run of more than MAX_WORD non-space characters is cut into pieces of at most that many
        # first: BPE training costs grows with the longest word, and 2 MB without a space (minified
        # code, base64) would otherwise train for minutes; no word of ordinary text is that long
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_WORD}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        raw.train_from_iterator(texts, trainer)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
            clean_up_tokenization_spaces=False,
        )
        tok = cls(hf, **options)
        if save_dir is not None:
            tok.save(save_dir)
        return tok

    def save(self, directory: str | os.PathLike) -> None:
        """Write an ordinary transformers tokenizer directory (``AutoTokenizer.from_pretrained`` reads it)."""
        os.makedirs(directory, exist_ok=True)
        self.hf.save_pretrained(os.fspath(directory))

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids the model must embed (base vocabulary plus added tokens)."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """One text -> token ids, no special tokens, no truncation (for corpora)."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.hf(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        *,
        max_length: Optional[int] = None,
        padding: Union[str, bool, None] = None,
        truncation: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> dict[str, Tensor]:
        """Batch encode: ``{"input_ids": (batch, seq) int64, "attention_mask": (batch, seq) int64}``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise TokenizerError("no texts to encode")
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError("texts must be strings")
        max_length = self.max_length if max_length is None else max_length
        padding = self.padding if padding is None else ("longest" if padding is True else padding)
        truncation = self.truncation if truncation is None else truncation
        side = self.padding_side if padding_side is None else padding_side
        if padding == "max_length" and max_length is None:
            raise TokenizerError("padding='max_length' needs max_length")
        ids = self.encode_batch(texts)
        if truncation and max_length is not None:
            ids = [x[:max_length] if side == "right" else x[-max_length:] for x in ids]
        if padding is False:
            if len({len(x) for x in ids}) > 1:
                raise TokenizerError("texts have different lengths; pass padding='longest' to batch them")
            width = len(ids[0])
        else:
            width = max_length if padding == "max_length" else max(len(x) for x in ids)
            width = max(width, max(len(x) for x in ids))
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            if not x:
                continue
            row = torch.tensor(x, dtype=torch.long)
            if side == "right":
                input_ids[i, : len(x)], mask[i, : len(x)] = row, 1
            else:
                input_ids[i, width - len(x):], mask[i, width - len(x):] = row, 1
        return {"input_ids": input_ids, "attention_mask": mask}

    tokenize_text = __call__  # the guide's name

    def create_attention_mask(self, input_ids: Tensor) -> Tensor:
        """The guide's helper: 1 where ``input_ids`` is not the pad id."""
        return (input_ids != self.pad_token_id).long()

    def decode(self, ids, skip_special_tokens: bool = True):
        """Ids -> text: a 1-d sequence gives a string, a 2-d tensor or list of lists gives a list."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.hf.decode(x, skip_special_tokens=skip_special_tokens) for x in ids]
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    decode_tokens = decode  # the guide's name

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


def _looks_like_hub_name(name: str) -> bool:
    """``org/model`` (one slash, no leading dot or slash) is a hub name, not a path."""
    return name.count("/") == 1 and not name.startswith(("/", ".")) and os.sep == "/"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


class LazyTokenizer(Tokenizer):
    """A saved tokenizer directory whose size and eos id are already known (a prepared
    directory's index records them): :meth:`Tokenizer.load` runs (and imports transformers, ~1 s)
    only when the tokenizer is used on text; :meth:`save` copies the directory as it is until then.
    On loading, the size and eos id must be the ones given and ``check`` (when given) is called
    with the loaded tokenizer (a prepared directory checks its hash)."""

    def __init__(self, directory: str | os.PathLike, *, vocab_size: int, eos_token_id: int, check=None, **options):
        self.directory = os.fspath(directory)
        self._known = (int(vocab_size), int(eos_token_id))
        self._check, self._options, self._loaded = check, options, None

    def load_now(self) -> Tokenizer:
        """The loaded tokenizer (loaded and checked on the first call)."""
        if self._loaded is None:
            tok = Tokenizer.load(self.directory, **self._options)
            if (tok.vocab_size, tok.eos_token_id) != self._known:
                raise TokenizerError(f"tokenizer directory {self.directory!r} has {tok.vocab_size} tokens and eos id "
                                     f"{tok.eos_token_id}, not {self._known[0]} and {self._known[1]} as recorded")
            if self._check is not None:
                self._check(tok)
            self._loaded = tok
        return self._loaded

    def __getattr__(self, name: str):  # the options (max_length, padding, ...) of the loaded tokenizer
        if name.startswith("_") or name in ("directory", "load_now"):
            raise AttributeError(name)
        return getattr(self.load_now(), name)

    @property
    def hf(self):
        return self.load_now().hf

    @property
    def vocab_size(self) -> int:
        return self._known[0]

    @property
    def eos_token_id(self) -> int:
        return self._known[1]

    def save(self, directory: str | os.PathLike) -> None:
        if self._loaded is not None:
            return self._loaded.save(directory)
        import shutil

        shutil.copytree(self.directory, os.fspath(directory), dirs_exist_ok=True)

    def __repr__(self) -> str:
        state = "loaded" if self._loaded is not None else "not loaded yet"
        return f"LazyTokenizer({self.directory!r}, vocab_size={self.vocab_size}, {state})"
