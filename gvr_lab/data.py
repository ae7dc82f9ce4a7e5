"""Datasets and the device-resident augmenting loader.

Every split is held whole as a uint8 tensor (N, C, H, W) on the training device, as airbench does:
no DataLoader workers, no per-image PIL transforms. Augmentation runs on the batch in a few tensor
ops, with its own generator seeded from (seed, epoch), so an epoch is reproducible on its own and a
resumed run sees exactly the batches an uninterrupted one would. Under data parallelism every
rank walks the same global order, takes its slice of each global batch and augments it with its
rows of the global batch's random draws (Draws): the ranks together see what one process sees.

Datasets: `fashion_mnist` (the offline default), `cifar10`, `cifar100` (torchvision's on-disk
format) and `synthetic` (deterministic, for tests and smoke runs). Files are looked up in
$GVR_LAB_DATA, ./data and Debian's /usr/share/datasets, then downloaded through torchvision when
online; set GVR_LAB_OFFLINE=1 to never try.

A dataset is registered as a model is: `@register_dataset(DatasetInfo(...))` on the function that
loads its (train, test) splits as uint8 tensors (docs/adding_a_dataset.md).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from .errors import UsageError, check_choice


@dataclass
class Batch:
    """One training batch. `index` holds the dataset indices of the rows; `x2` a second view."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None
    x2: torch.Tensor | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """What the loop needs to know of a dataset: classes, image shape, and the per-channel mean
    and std (of [0, 1] pixel values) it normalizes with."""

    name: str
    num_classes: int
    channels: int
    size: int  # images are size x size
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,): what the model is trained (or evaluated) on
    clean_labels: torch.Tensor | None = None  # the true labels where `labels` carry label noise


Loader = Callable[..., tuple[Split, Split]]  # data_dir (a folder searched first, or None) -> (train, test)
DATASETS: dict[str, tuple[DatasetInfo, Loader]] = {}


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Register the decorated loader under info.name; a taken name is refused."""

    def register(load: Loader) -> Loader:
        if info.name in DATASETS:
            raise ValueError(f"dataset {info.name!r} is already registered")
        if info.channels not in (1, 3) or len(info.mean) != info.channels or len(info.std) != info.channels:
            raise ValueError(f"dataset {info.name!r}: 1 or 3 channels, with a mean and a std per channel")
        DATASETS[info.name] = (info, load)
        return load

    return register


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def markdown_table() -> str:
    """README's dataset table, from the registry: name, classes, image shape, and the first
    paragraph of its loader's docstring (what it is, where it is looked up)."""
    rows = ["| dataset | classes | images | what, and where it is looked up |", "|---|---|---|---|"]
    for name in list_datasets():
        info, load = DATASETS[name]
        what = " ".join((load.__doc__ or "").strip().split("\n\n")[0].split())
        rows.append(f"| `{name}` | {info.num_classes} | {info.channels}x{info.size}x{info.size} | {what} |")
    return "\n".join(rows)


def dataset_info(name: str) -> DatasetInfo:
    check_choice("dataset", name, list_datasets())
    return DATASETS[name][0]


# --------------------------------------------------------------------------- locating files


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = [data_dir, os.environ.get("GVR_LAB_DATA"), "data", "/usr/share/datasets"]
    return [Path(d) for d in dirs if d]


def offline() -> bool:
    return os.environ.get("GVR_LAB_OFFLINE", "") not in ("", "0")


def download_root(data_dir) -> Path:
    return search_dirs(data_dir)[0]


# --------------------------------------------------------------------------- Fashion-MNIST (idx)

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Layouts seen in the wild: flat, Debian's folder, torchvision's FashionMNIST/raw.
FASHION_SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")


def find_fashion_dir(data_dir) -> Path | None:
    for root in search_dirs(data_dir):
        for sub in FASHION_SUBDIRS:
            d = root / sub
            if all(idx_path(d, f) for f in FASHION_FILES["train"] + FASHION_FILES["test"]):
                return d
    return None


def idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Parse one idx file (MNIST's format), checking magic, dimensions and length."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UsageError(f"corrupt dataset file {path}: {e}") from None
    if len(raw) < 4 + 4 * expect_dims:
        raise UsageError(f"corrupt dataset file {path}: only {len(raw)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        raise UsageError(f"corrupt dataset file {path}: not a uint8 idx file with {expect_dims} dims")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise UsageError(f"corrupt dataset file {path}: header says {shape} but holds {len(body)} bytes (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


@register_dataset(DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)))
def load_fashion_mnist(data_dir=None) -> tuple[Split, Split]:
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k, the offline default: its idx files from
    `$GVR_LAB_DATA`, `./data` or `/usr/share/datasets/fashion-mnist` (Debian's package), else
    torchvision's download."""
    folder = find_fashion_dir(data_dir)
    if folder is None:
        folder = download_with_torchvision("FashionMNIST", data_dir) / "FashionMNIST" / "raw"
    return tuple(idx_split(folder, *FASHION_FILES[part], num_classes=10, size=28) for part in ("train", "test"))


def idx_split(folder: Path, images_stem: str, labels_stem: str, num_classes: int, size: int) -> Split:
    """A split from an idx pair (MNIST's format; the file plain or .gz): images (N, size, size) as
    one channel, labels (N,), both checked."""
    img_file, lbl_file = idx_path(folder, images_stem), idx_path(folder, labels_stem)
    if img_file is None or lbl_file is None:
        raise UsageError(f"{folder} lacks {images_stem} or {labels_stem} (plain or .gz)")
    images, labels = read_idx(img_file, 3), read_idx(lbl_file, 1)
    if images.shape[1:] != (size, size):
        raise UsageError(f"corrupt dataset file {img_file}: images are {images.shape[1:]}, not {size}x{size}")
    return checked_split(images[:, None], labels, num_classes, img_file, lbl_file)


def checked_split(images: np.ndarray, labels: np.ndarray, num_classes: int, img_file, lbl_file) -> Split:
    if len(images) != len(labels):
        raise UsageError(
            f"dataset files disagree: {img_file} has {len(images)} images, {lbl_file} {len(labels)} labels"
        )
    if len(labels) == 0:
        raise UsageError(f"dataset file {lbl_file} holds no examples")
    if labels.max() >= num_classes:
        raise UsageError(f"corrupt dataset file {lbl_file}: label {int(labels.max())} outside [0, {num_classes})")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


# --------------------------------------------------------------------------- CIFAR (python pickles)

CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "CIFAR10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
        "CIFAR100",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def load_cifar(name: str, data_dir=None) -> tuple[Split, Split]:
    folder_name, train_files, test_files, label_key, tv_name, url = CIFAR[name]
    wanted = train_files + test_files
    folder = next(
        (r / folder_name for r in search_dirs(data_dir) if all((r / folder_name / f).is_file() for f in wanted)), None
    )
    if folder is None:
        where = ", ".join(str(d) for d in search_dirs(data_dir))
        hint = (
            f"{name} not found: put the extracted {folder_name}/ folder (from {url}) into one of: {where}"
            " (or set GVR_LAB_DATA)"
        )
        folder = download_with_torchvision(tv_name, data_dir, hint) / folder_name
    num_classes = dataset_info(name).num_classes
    return tuple(
        read_cifar_files([folder / f for f in files], label_key, num_classes) for files in (train_files, test_files)
    )


# The GVR code's constants; Novack's differ in the 4th digit.
@register_dataset(DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))
def load_cifar10(data_dir=None) -> tuple[Split, Split]:
    """CIFAR-10 (Krizhevsky 2009), 50k/10k, torchvision's on-disk format (`cifar-10-batches-py/`)
    from `$GVR_LAB_DATA` or `./data`, else torchvision's download; offline, exits 2 saying where
    to put the files."""
    return load_cifar("cifar10", data_dir)


@register_dataset(DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)))
def load_cifar100(data_dir=None) -> tuple[Split, Split]:
    """CIFAR-100 (Krizhevsky 2009), 50k/10k, fine labels, torchvision's on-disk format
    (`cifar-100-python/`), found or downloaded as CIFAR-10."""
    return load_cifar("cifar100", data_dir)


def read_cifar_files(paths: list[Path], label_key: bytes, num_classes: int) -> Split:
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            lbl = np.asarray(entry[label_key], dtype=np.int64)
        except Exception as e:  # a truncated pickle can raise almost anything
            raise UsageError(f"corrupt dataset file {path}: {type(e).__name__}: {e}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lbl):
            raise UsageError(f"corrupt dataset file {path}: data {data.shape}, {len(lbl)} labels")
        if len(lbl) and (lbl.min() < 0 or lbl.max() >= num_classes):
            raise UsageError(f"corrupt dataset file {path}: labels outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lbl)
    return checked_split(np.concatenate(images), np.concatenate(labels), num_classes, paths[0], paths[0])


def download_with_torchvision(tv_name: str, data_dir, hint: str | None = None) -> Path:
    root = download_root(data_dir)
    hint = hint or f"{tv_name} not found in {', '.join(map(str, search_dirs(data_dir)))}"
    if offline():
        raise UsageError(f"{hint}; GVR_LAB_OFFLINE is set, so no download was tried")
    try:
        getattr(torchvision.datasets, tv_name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, tv_name)(str(root), train=False, download=True)
    except Exception as e:
        raise UsageError(f"{hint}; download failed ({type(e).__name__})") from None
    return root


# --------------------------------------------------------------------------- synthetic


@register_dataset(DatasetInfo("synthetic", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
def make_synthetic(data_dir=None) -> tuple[Split, Split]:
    """Ten classes of smooth random templates plus per-image noise, 2048/512 images, generated:
    learnable, deterministic, for tests and smoke runs."""
    g = torch.Generator().manual_seed(0)
    templates = torch.nn.functional.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=32, mode="bilinear")

    def draw(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        x = 128 + 48 * templates[labels] + 40 * torch.randn(n, 3, 32, 32, generator=g)
        return Split(x.clamp(0, 255).round().to(torch.uint8), labels)

    return draw(2048), draw(512)


def load_dataset(name: str, data_dir=None) -> tuple[Split, Split]:
    """(train, test) splits of a registered dataset as uint8 CPU tensors, checked against its info."""
    info = dataset_info(name)
    train, test = DATASETS[name][1](data_dir)
    for split, part in ((train, "train"), (test, "test")):
        shape = tuple(split.images.shape[1:])
        if split.images.dtype != torch.uint8 or shape != (info.channels, info.size, info.size):
            raise UsageError(
                f"dataset {name!r}: its {part} images are {split.images.dtype} {shape}, its info says uint8 "
                f"{(info.channels, info.size, info.size)}"
            )
    return train, test


# --------------------------------------------------------------------------- splits


def split_indices(n: int, train_subset: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index sets. val_split < 1 is a fraction of n, >= 1 a count."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    n_val = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if n_val >= n:
        raise UsageError(f"val_split={val_split} leaves no training examples out of {n}")
    val, train = perm[:n_val], perm[n_val:]
    if train_subset:
        if train_subset > len(train):
            raise UsageError(f"train_subset={train_subset} exceeds the {len(train)} training examples")
        train = train[:train_subset]
    return train.sort().values, val.sort().values


# --------------------------------------------------------------------------- label noise

NOISE_KINDS = ("symmetric", "asymmetric")
# Asymmetric noise flips a class into one it is confused with. CIFAR-10: the mapping of Patrini et
# al. (CVPR 2017) that noisy-label codes share (truck -> automobile, bird -> airplane, deer ->
# horse, cat <-> dog). Fashion-MNIST, ours, by look-alike garments: T-shirt/top -> shirt, pullover
# -> coat, coat -> pullover, sandal -> sneaker, sneaker -> ankle boot. Other datasets: class c ->
# c + 1 mod C. Classes not in a mapping keep their labels.
ASYMMETRIC = {"cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}, "fashion_mnist": {0: 6, 2: 4, 4: 2, 5: 7, 7: 9}}


def with_label_noise(
    split: Split, rows: torch.Tensor, fraction: float, kind: str, dataset: str, num_classes: int, seed: int
) -> Split:
    """`split` with the labels of `rows` (the examples a run trains on) corrupted, a function of
    `seed` alone, so every method of a seed sees the same noisy labels.

    symmetric: round(fraction * len(rows)) rows, drawn without replacement, get a label drawn
    uniformly from the other C - 1 classes (so exactly that fraction is wrong). asymmetric: of the
    rows whose class has a mapping (ASYMMETRIC), round(fraction * their count) get the mapped class.
    """
    check_choice("label_noise_kind", kind, NOISE_KINDS)
    g = torch.Generator().manual_seed(1_000_033 + seed)
    clean = split.labels
    labels = clean.clone()
    if kind == "symmetric":
        flip = rows[torch.randperm(len(rows), generator=g)[: round(fraction * len(rows))]]
        offset = torch.randint(1, num_classes, (len(flip),), generator=g)
        labels[flip] = (clean[flip] + offset) % num_classes
    else:
        mapping = ASYMMETRIC.get(dataset) or {c: (c + 1) % num_classes for c in range(num_classes)}
        source = torch.tensor(sorted(mapping))
        target = torch.full((num_classes,), -1, dtype=torch.long)
        target[source] = torch.tensor([mapping[c] for c in sorted(mapping)])
        eligible = rows[torch.isin(clean[rows], source)]
        flip = eligible[torch.randperm(len(eligible), generator=g)[: round(fraction * len(eligible))]]
        labels[flip] = target[clean[flip]]
    return Split(split.images, labels, clean)


# --------------------------------------------------------------------------- batched augmentation


@dataclass(frozen=True)
class Draws:
    """The random numbers of the rows [start, start + n) of a global batch of `total` rows.

    Under data parallelism every rank draws the numbers of the whole global batch from the same
    generator and keeps its rows, so the ranks' slices are augmented exactly as one process
    augments the whole batch (one generator per rank would give row j of every rank the same
    crop, flip and Cutout). With one process, total = n and nothing is discarded.
    """

    g: torch.Generator
    total: int
    start: int = 0

    @classmethod
    def of(cls, g: torch.Generator | Draws, n: int) -> Draws:
        return g if isinstance(g, Draws) else cls(g, n)

    def randint(self, high: int, n: int) -> torch.Tensor:
        """(n, 1) ints uniform in [0, high)."""
        drawn = torch.randint(0, high, (self.total, 1), generator=self.g, device=self.g.device)
        return drawn[self.start : self.start + n]

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(self.total, generator=self.g, device=self.g.device)[self.start : self.start + n]


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator | Draws) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch (torchvision RandomCrop(size, padding=pad))."""
    n, c, h, w = x.shape
    draws = Draws.of(g, n)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = draws.randint(2 * pad + 1, n)
    dx = draws.randint(2 * pad + 1, n)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator | Draws) -> torch.Tensor:
    flip = Draws.of(g, x.shape[0]).rand(x.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, p: float, size: int, g: torch.Generator | Draws) -> torch.Tensor:
    """Cutout as in the GVR/SAM code: with probability p, zero a size x size square whose centre is
    uniform over the image (so it may hang off the border). Runs after normalization, so zero is the
    dataset mean."""
    n, _, h, w = x.shape
    draws = Draws.of(g, n)
    apply = draws.rand(n) < p
    top = draws.randint(h, n) - size // 2
    left = draws.randint(w, n) - size // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= top) & (r < top + size)
    in_cols = (c >= left) & (c < left + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


@dataclass(frozen=True)
class Augment:
    crop_pad: int = 4
    flip: bool = True
    cutout_p: float = 0.0
    cutout_size: int = 16


class DeviceLoader:
    """Yields Batch objects from a split held on the device, augmenting per sample in batch.

    `indices` selects rows of the split (a subset or validation part); Batch.index reports them
    as indices into the full split, so per-sample memories stay valid whatever the subset.
    `channels`, the channels the model takes, repeats a 1-channel image's channel to them (a model
    built for 3 channels on grey images), after augmentation, which acts alike on every channel.
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        *,
        batch_size: int,
        device: torch.device,
        indices: torch.Tensor | None = None,
        augment: Augment | None = None,
        views: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels: int | None = None,
    ):
        if channels not in (None, info.channels) and info.channels != 1:
            raise UsageError(
                f"the model takes {channels}-channel images and dataset {info.name!r} has {info.channels} channels: "
                "only 1-channel images are repeated to a model's channels"
            )
        self.channels = channels or info.channels
        self.index = torch.arange(len(split.labels)) if indices is None else indices
        self.images = split.images[self.index].to(device)
        self.labels = split.labels[self.index].to(device)
        # Of these rows, the fraction whose label is not the true one (label noise).
        self.noisy_fraction = (
            0.0
            if split.clean_labels is None
            else float((split.labels[self.index] != split.clean_labels[self.index]).float().mean())
        )
        self.index = self.index.to(device)
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.batch_size, self.device, self.augment, self.views = batch_size, device, augment, views
        self.shuffle, self.drop_last, self.seed, self.channels_last = shuffle, drop_last, seed, channels_last
        if drop_last and len(self.labels) < batch_size:
            raise UsageError(f"batch_size={batch_size} exceeds the {len(self.labels)} training examples")
        if batch_size % world_size:
            raise UsageError(f"batch_size={batch_size} must be divisible by the {world_size} data-parallel ranks")
        # Under data parallelism every rank walks the same global order and takes its slice of
        # each global batch, so the union over ranks is exactly the single-process batch.
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def view(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        a = self.augment
        if a is not None and a.crop_pad:
            images = random_crop(images, a.crop_pad, draws)
        x = (images.float() / 255 - self.mean) / self.std
        if a is not None and a.flip:
            x = random_flip(x, draws)
        if a is not None and a.cutout_p > 0:
            x = cutout(x, a.cutout_p, a.cutout_size, draws)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def epoch(self, epoch: int):
        """The batches of one epoch; a function of (seed, epoch) only."""
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=g, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        )
        local = self.batch_size // self.world_size
        for i in range(len(self)):
            start = i * self.batch_size
            rows = order[start + self.rank * local : start + (self.rank + 1) * local]
            # The augmentation of the whole global batch (its last one may be short), this rank's rows of it.
            draws = Draws(g, len(order[start : start + self.batch_size]), self.rank * local)
            images = self.images[rows]
            x = self.view(images, draws)
            x2 = self.view(images, draws) if self.views == 2 else None
            yield Batch(x, self.labels[rows], self.index[rows], x2)
