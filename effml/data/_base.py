"""What every datamodule shares: the common config, the epoch-seeded sampler, the resumable train
loader, the base class.

Splits are drawn with ``cfg.split_seed`` (part of the config, fixed by default), never with the
run seed: changing ``seed=`` changes only the order the train split is visited in.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from effml.data import DataInfo
from effml.errors import EffmlError

NO_HASH = {"hash": False}  # field metadata: the value does not change results, so the run id skips it


@dataclass
class DataConfig:
    """Fields every dataset has; each dataset's config subclasses this and sets ``name``."""

    name: str = ""
    batch_size: int = 128
    eval_batch_size: int = field(default=512, metadata=NO_HASH)  # evaluation results do not depend on it
    val_size: int = 5000  # held out from the train split with split_seed
    train_subset: int | None = None  # use only the first N of the shuffled train split
    split_seed: int = 0  # fixes the train/val(/test) split, independent of the run seed
    num_workers: int = field(default=0, metadata=NO_HASH)
    data_dir: str | None = field(default=None, metadata=NO_HASH)  # read the files from here instead

    def __post_init__(self) -> None:
        positive(self, "batch_size", "eval_batch_size")
        non_negative(self, "val_size", "num_workers", "split_seed")
        if self.train_subset is not None:
            positive(self, "train_subset")


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise EffmlError(f"data.{name} must be > 0, got {getattr(cfg, name)}")


def non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise EffmlError(f"data.{name} must be >= 0, got {getattr(cfg, name)}")


class EpochSeededSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` at the start of every epoch (also through its distributed
    wrapper), so a run resumed at an epoch boundary visits the data in exactly the order an
    uninterrupted run does. Mid-epoch, :class:`ResumableLoader` sets ``start``: the next pass
    leaves out that many examples of the epoch's order (those already trained on) and yields the rest.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world: int = 1, batch: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0  # for the next pass only; the length stays the epoch's, as Lightning counts it
        # In a run of `world` processes (effml.distributed) each rank takes its slice of every global
        # batch (`batch` per rank) of the same permutation: the ranks together train on exactly the
        # batches one process would, and their averaged gradient is that process's.
        self.rank, self.world, self.batch = rank, world, batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        start, self.start = self.start, 0
        return iter(self._mine(torch.randperm(self.num_samples, generator=generator))[start:].tolist())

    def _mine(self, order: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return order
        chunks = order.split(self.batch * self.world)
        if len(chunks[-1]) < self.world:  # a last global batch too small to give every rank an example
            chunks = chunks[:-1]
        return torch.cat([c.tensor_split(self.world)[self.rank] for c in chunks])

    def __len__(self) -> int:
        return len(self._mine(torch.arange(self.num_samples)))


class ResumableLoader(DataLoader):
    """The train loader: a DataLoader that knows where in the epoch it is, so that a run killed
    after a mid-epoch checkpoint (``trainer.checkpoint_every_n_steps``) resumes exactly there.

    Lightning's fit loop saves the ``state_dict()`` of a train loader that has one (its ``_Stateful``
    protocol) in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on resume,
    passes it to ``load_state_dict`` before iterating the loader. The state is the epoch and the
    number of its batches yielded so far. The order depends only on (seed, epoch), so the resumed pass
    starts the sampler that many batches into the epoch's permutation (skipping examples without
    loading them) and yields exactly the batches an uninterrupted run would see next.

    - Batches are counted as they leave the loader, not in the sampler, because worker processes take
      indices ahead. Lightning does not prefetch from a loader with a length, so at
      ``on_train_batch_end``, where checkpoints are saved, the count is the batches trained on.
    - A pass begins at its first batch (this ``__iter__`` is a generator), after Lightning's
      ``set_epoch``. The underlying iterator (and its worker processes, which take indices at once) is
      made only then, so even a pass resumed at a later epoch starts from that epoch's order.
    - Worker seeds are drawn from the loader's own generator, reseeded every epoch, never from
      torch's global RNG. A resumed run starts one pass more than an uninterrupted one, after its
      checkpoint's RNG state has been restored; a draw from the global RNG there would shift every
      later dropout mask and augmentation.
    """

    # class-level defaults: Lightning re-creates DataLoaders from their __init__ arguments
    _epoch = 0  # the epoch of the current (or last) pass
    _batches = 0  # batches of it yielded so far, counting those a resumed pass left out
    _resume: tuple[int, int] | None = None  # (epoch, batches) of a checkpoint, until the next pass

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0  # another epoch: it had ended
        if skip and not isinstance(sampler, EpochSeededSampler):  # e.g. Lightning's distributed wrapper
            warnings.warn(f"resuming mid-epoch with {type(sampler).__name__}, which cannot start mid-epoch: "
                          "this epoch's remaining batches are drawn from its start", stacklevel=2)
        elif skip:
            sampler.start = skip * self.batch_size
        if self.generator is not None and isinstance(sampler, EpochSeededSampler):
            self.generator.manual_seed(sampler.seed * 100003 + epoch)
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class TensorDictDataset(Dataset):
    """In-memory tensors, one dict per example: ``{"x": float tensor, "labels": long}``."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        assert len(x) == len(labels)
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


def permutation(n: int, seed: int) -> np.ndarray:
    """The fixed shuffle that all splits are cut from (numpy, so it is stable across torch versions)."""
    return np.random.default_rng(seed).permutation(n)


def cut(n: int, sizes: list[int], seed: int, what: str) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into the given sizes plus the rest (last)."""
    if sum(sizes) >= n:
        raise EffmlError(f"{what} must be < {n} (the examples available), got {sum(sizes)}")
    order = permutation(n, seed)
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)] + [order[bounds[-1] :]]


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def load_from_hub(name: str, *args: Any, cache_dir: str | None = None, hint: str = "") -> Any:
    """``datasets.load_dataset`` with the offline failure turned into one line."""
    import datasets

    try:
        return datasets.load_dataset(*args, cache_dir=cache_dir)
    except (ConnectionError, OSError) as err:  # offline: ConnectionError; a broken cache: OSError
        raise EffmlError(
            f"{name} needs internet to download from the Hugging Face hub ({type(err).__name__}: "
            f"offline here?); {hint}or pre-download it into the HF cache"
        ) from err


class EffmlDataModule(L.LightningDataModule):
    """Base datamodule: subclasses implement ``load()`` returning the three splits and the info."""

    task = "classification"  # what the labels are for (effml.task.TASKS); the LM corpora say "lm"

    def __init__(self, cfg: DataConfig, seed: int = 0, tokenizer: Any = None):
        super().__init__()
        self.cfg, self.seed, self.tokenizer = cfg, seed, tokenizer
        self.splits: dict[str, Dataset] | None = None
        self._info: DataInfo | None = None

    def load(self) -> tuple[dict[str, Dataset], DataInfo]:
        """``({"train", "val", "test"}: datasets of dict examples, info without the split sizes)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:  # idempotent: Lightning calls it for fit, then for test
            return
        splits, info = self.load()
        info.num_train, info.num_val, info.num_test = (len(splits[s]) for s in ("train", "val", "test"))
        self.splits, self._info = splits, info

    @property
    def info(self) -> DataInfo:
        self.setup()
        return self._info

    def restore_from(self, run_dir) -> None:
        """Before ``setup``: reuse what an earlier attempt of this run saved (none here)."""

    def save_to(self, run_dir) -> None:
        """Once the run folder exists: save what a rerun must reuse (none here)."""

    def train_val_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Hold ``val_size`` out of a train pool of ``n`` with the split seed; apply ``train_subset``."""
        val, train = cut(n, [self.cfg.val_size], self.cfg.split_seed, "data.val_size")
        if self.cfg.train_subset is not None:
            if self.cfg.train_subset > len(train):
                raise EffmlError(
                    f"data.train_subset must be <= {len(train)} (the training examples), "
                    f"got {self.cfg.train_subset}"
                )
            train = train[: self.cfg.train_subset]
        return train, val

    # -- loaders ---------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(examples)

    def _loader(self, split: str, batch_size: int, sampler: Sampler | None = None,
                loader: type[DataLoader] = DataLoader) -> DataLoader:
        self.setup()
        workers = self.cfg.num_workers
        return loader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,  # the order comes from the sampler (train) or is the stored order (eval)
            drop_last=False,
            collate_fn=self.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # worker seeds from a generator of the loader's own, not from torch's global RNG: a resumed
            # run iterates its loaders at other points than an uninterrupted one (ResumableLoader)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        from effml import distributed

        rank, world = distributed.shard()
        sampler = EpochSeededSampler(len(self.splits["train"]), seed=self.seed, rank=rank, world=world,
                                     batch=self.cfg.batch_size)
        return self._loader("train", self.cfg.batch_size, sampler, loader=ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size)

    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The first ``batch_size`` test examples (cycled if the split is smaller), without labels."""
        self.setup()
        test = self.splits["test"]
        batch = self.collate([test[i % len(test)] for i in range(batch_size)])
        batch.pop("labels")
        return batch

    def example_labels(self, batch_size: int) -> torch.Tensor:
        """Labels for ``example_inputs``' batch, to time a training step (values do not change its cost)."""
        return torch.randint(self.info.num_classes, (batch_size,), generator=torch.Generator().manual_seed(0))
