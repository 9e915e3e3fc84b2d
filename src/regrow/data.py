"""Data: Fashion-MNIST from idx files, a tiny synthetic set for tests, deterministic batches and subsets.

Batches are a pure function of (seed, epoch, batch index): the shuffle and the crop/flip of each batch come
from generators seeded by those numbers, so a run resumed mid-epoch sees exactly the batches it would have.
Datasets live in memory as normalised float tensors (Fashion-MNIST: 60 000 × 28 × 28, about 190 MB).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, unknown
from .plugins import call_factory, is_import_spec, load_object

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "REGROW_DATA_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float, normalised
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    pad_value: float = 0.0  # the normalised value of a black pixel, used to pad random crops

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def input_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices: torch.Tensor) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.num_classes, self.pad_value)


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (optionally gzip-compressed) into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip: a truncated or damaged stream raises all three
        raise DataError(f"cannot read {path}: {e or type(e).__name__} (truncated or damaged?)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} has a short idx header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise DataError(f"{path} is truncated: {len(body)} bytes of data, header says {expected}")
    if expected == 0:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder to read: the argument, else $REGROW_DATA_DIR, else the Debian package's folder."""
    folder = Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (folder / name).exists()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}). Install it with "
            f"'apt-get install dataset-fashion-mnist' (files go to {DEFAULT_FASHION_MNIST_DIR}), or point "
            f"--data-dir or ${DATA_DIR_ENV} at a folder holding the four idx .gz files.")
    return folder


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    if split not in FASHION_MNIST_FILES:
        raise unknown("split", split, FASHION_MNIST_FILES)
    folder = fashion_mnist_dir(data_dir)
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file).long()
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split} files in {folder} disagree: {tuple(images.shape)} images, "
                        f"{tuple(labels.shape)} labels")
    if images.shape[0] == 0:
        raise DataError(f"Fashion-MNIST {split} split in {folder} is empty")
    if int(labels.max()) >= 10:
        raise DataError(f"Fashion-MNIST {split} labels in {folder} go up to {int(labels.max())}; the classes are "
                        "0-9")
    x = (images.float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)).unsqueeze(1)
    return Dataset(x, labels, 10, pad_value=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)


def synthetic(n: int = 512, num_classes: int = 4, in_channels: int = 1, size: int = 12, seed: int = 0,
              noise: float = 0.5) -> Dataset:
    """A small learnable dataset: one random template per class plus Gaussian noise. For tests and demos."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_channels, size, size, generator=g)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = templates[labels] + noise * torch.randn(n, in_channels, size, size, generator=g)
    return Dataset(images, labels, num_classes)


def load_dataset(name: str, split: str, data_dir: str | None = None, *, synthetic_size: int = 512,
                 seed: int = 0) -> Dataset:
    """A split ("train" or "test") of ``fashion-mnist``, ``synthetic`` or a user's ``package.module:factory``."""
    if split not in ("train", "test"):
        raise unknown("split", split, ["train", "test"])
    if is_import_spec(name):
        return user_datasets(name)[0 if split == "train" else 1]
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "synthetic":
        # Train and test are disjoint draws from the same class templates.
        full = synthetic(2 * synthetic_size, seed=seed)
        half = torch.arange(synthetic_size) if split == "train" else torch.arange(synthetic_size, 2 * synthetic_size)
        return full.subset(half)
    raise unknown("dataset", name, ["fashion-mnist", "synthetic", "package.module:factory"])


TOKEN_DTYPES = (torch.int64, torch.int32)  # integer inputs that are ids, not pixels


@functools.lru_cache(maxsize=1)  # train and test come from one call of the factory
def user_datasets(spec: str) -> tuple[Dataset, Dataset]:
    """A user's factory, called without arguments, returns ``(train, test)``; each may be a regrow
    :class:`Dataset`, a pair of tensors ``(inputs, labels)`` or any map-style dataset of ``(input, label)``
    samples (a ``torch.utils.data.Dataset``). Inputs are floats, or int64/int32 token ids (kept as int64).
    Samples are stacked into memory once; labels are class indices, and the number of classes is the factory's
    ``num_classes`` attribute or, without one, the largest label + 1 over both splits."""
    factory = load_object(spec, "dataset")
    result = call_factory(factory, spec, "dataset")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"dataset {spec!r} must return (train, test), got {type(result).__name__}")
    splits = [_as_tensors(part, spec, split) for part, split in zip(result, ("train", "test"))]
    declared = getattr(factory, "num_classes", None)
    num_classes = declared if isinstance(declared, int) else max(int(labels.max()) for _, labels in splits) + 1
    for (_, labels), split in zip(splits, ("train", "test")):
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise DataError(f"dataset {spec!r}: {split} labels span {int(labels.min())}..{int(labels.max())}, "
                            f"outside the {num_classes} classes")
    if splits[0][0].shape[1:] != splits[1][0].shape[1:]:
        raise DataError(f"dataset {spec!r}: train samples are {tuple(splits[0][0].shape[1:])}, test samples "
                        f"{tuple(splits[1][0].shape[1:])}")
    return tuple(Dataset(inputs, labels, num_classes) for inputs, labels in splits)


def _as_tensors(part, spec: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(part, Dataset):
        inputs, labels = part.images, part.labels
    elif isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part):
        inputs, labels = part
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        try:
            samples = [part[i] for i in range(len(part))]
            inputs = torch.stack([torch.as_tensor(x) for x, _ in samples]) if samples else torch.empty(0)
            labels = torch.as_tensor([int(y) for _, y in samples])
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"dataset {spec!r}: the {split} samples are not (input, label) pairs of equal-shaped "
                            f"tensors and class indices: {e}") from None
    else:
        raise DataError(f"dataset {spec!r}: the {split} split is a {type(part).__name__}; expected a pair of "
                        "tensors (inputs, labels) or a map-style dataset of (input, label)")
    if len(inputs) == 0 or len(inputs) != len(labels):
        raise DataError(f"dataset {spec!r}: the {split} split has {len(inputs)} inputs and {len(labels)} labels")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"dataset {spec!r}: the {split} labels must be a 1-d tensor of class indices")
    if inputs.dtype in TOKEN_DTYPES:  # token ids (an embedding reads them): kept as integers
        if int(inputs.min()) < 0:
            raise DataError(f"dataset {spec!r}: the {split} inputs are integers (token ids) and must be >= 0; "
                            f"the smallest is {int(inputs.min())}")
        return inputs.long().contiguous(), labels.long()
    if not inputs.is_floating_point():
        raise DataError(f"dataset {spec!r}: the {split} inputs are {inputs.dtype}; regrow takes float inputs, or "
                        "int64/int32 token ids (convert uint8 images to float, normalised)")
    return inputs.float().contiguous(), labels.long()


def subset_indices(labels: torch.Tensor, n: int, seed: int = 0, balanced: bool = False) -> torch.Tensor:
    """``n`` distinct indices, the same for the same seed; ``balanced`` takes (as near as possible) n/C per class."""
    total = labels.numel()
    if not isinstance(n, int) or n <= 0:
        raise DataError(f"subset size must be a positive integer, got {n!r}")
    if n > total:
        raise DataError(f"subset of {n} samples asked from a dataset of {total}")
    g = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randperm(total, generator=g)[:n].sort().values
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(idx.numel(), generator=g)] for idx in per_class]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    taken, leftover = [], []
    for idx, q in zip(per_class, quota):
        taken.append(idx[:q])
        leftover.append(idx[q:])
    chosen = torch.cat(taken)
    if chosen.numel() < n:  # some class was too small: fill from the rest, still seeded
        rest = torch.cat(leftover)
        chosen = torch.cat([chosen, rest[torch.randperm(rest.numel(), generator=g)[: n - chosen.numel()]]])
    return chosen.sort().values


def _seed(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value ^ (int(p) + 0x9E3779B9 + (value << 6) + (value >> 2))) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, pad_value: float = 0.0,
            flip: bool = True) -> torch.Tensor:
    """Random crop (pad, then shift by up to ``pad`` pixels) and horizontal flip, batched."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=pad_value)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]
    cols = torch.arange(w)[None, :] + dx[:, None]
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))


def get_batch(data: Dataset, batch_size: int, seed: int, epoch: int, index: int,
              train_augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th batch of ``epoch``: shuffled and augmented as a pure function of the arguments."""
    order = epoch_order(len(data), seed, epoch)
    idx = order[index * batch_size: (index + 1) * batch_size]
    x, y = data.images[idx], data.labels[idx]
    if train_augment:
        x = augment(x, torch.Generator().manual_seed(_seed(seed, epoch, index, 1)), pad_value=data.pad_value)
    return x, y


def eval_batches(data: Dataset, batch_size: int = 1000):
    for start in range(0, len(data), batch_size):
        yield data.images[start: start + batch_size], data.labels[start: start + batch_size]
