import pickle

import numpy as np
import pytest
import torch

from gvr_lab.data import (
    Augment,
    DeviceLoader,
    cutout,
    dataset_info,
    load_dataset,
    random_crop,
    random_flip,
    split_indices,
    with_label_noise,
)
from gvr_lab.errors import UsageError

from helpers import write_idx


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def crop_offsets(out):
    """Recover per-sample (dy, dx) of a crop from channel 0 = column+1, channel 1 = row+1."""

    def offset(first_line):
        nonzero = (first_line > 0).int()
        first = nonzero.argmax(1)
        return torch.where(first_line[:, 0] > 0, first_line[:, 0].long() + 3, 4 - first)

    return offset(out[:, 1, :, 16]), offset(out[:, 0, 16, :])


def test_crop_is_a_translation_covering_all_offsets():
    n = 9000
    cols = torch.arange(1, 33, dtype=torch.uint8).expand(32, 32)
    x = torch.stack([cols, cols.T]).expand(n, 2, 32, 32).contiguous()
    out = random_crop(x, 4, gen())
    dy, dx = crop_offsets(out)
    for d in (dy, dx):
        counts = torch.bincount(d, minlength=9)
        assert len(counts) == 9 and counts.min() > n / 9 * 0.85 and counts.max() < n / 9 * 1.15
    # every sample is its own translation of the input
    expect_cols = torch.arange(32) + dx[:, None] - 4 + 1
    expect_cols = torch.where((expect_cols >= 1) & (expect_cols <= 32), expect_cols, 0)
    assert torch.equal(out[:, 0, 16, :].long(), expect_cols)


def test_flip_about_half_and_exact():
    x = torch.arange(32, dtype=torch.float32).expand(4000, 1, 32, 32)
    out = random_flip(x, gen(1))
    flipped = out[:, 0, 0, 0] == 31
    assert torch.all(flipped | (out[:, 0, 0, 0] == 0))
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    assert torch.equal(out[flipped], x[flipped].flip(-1))


def test_cutout_probability_size_and_position():
    n = 8000
    out = cutout(torch.ones(n, 3, 32, 32), 0.5, 16, gen(2))
    masked = out[:, 0] == 0
    area = masked.sum((1, 2))
    hit = area > 0
    assert abs(hit.float().mean().item() - 0.5) < 0.03
    assert area.max() == 256 and torch.all(masked == (out == 0).all(1))  # all channels, at most 16x16
    # patches hang off the border: some are clipped, and every pixel gets covered by some patch
    assert (area[hit] < 256).float().mean() > 0.3
    assert masked.any(0).all()


def test_loader_views_independent_and_epoch_covers_each_index_once():
    train, _ = load_dataset("synthetic")
    info = dataset_info("synthetic")
    idx = torch.arange(0, 2048, 3)
    loader = DeviceLoader(
        train,
        info,
        batch_size=100,
        device=torch.device("cpu"),
        indices=idx,
        augment=Augment(cutout_p=0.5),
        views=2,
        drop_last=False,
        seed=3,
    )
    batches = list(loader.epoch(0))
    seen = torch.cat([b.index for b in batches])
    assert torch.equal(seen.sort().values, idx)
    for b in batches:
        assert torch.equal(b.y, train.labels[b.index])
    differs = (batches[0].x != batches[0].x2).flatten(1).any(1)
    assert differs.float().mean() > 0.9
    # an epoch is a function of (seed, epoch) only
    again = next(iter(loader.epoch(0)))
    assert torch.equal(again.x, batches[0].x) and torch.equal(again.x2, batches[0].x2)
    assert not torch.equal(next(iter(loader.epoch(1))).index, batches[0].index)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_augment_their_slices_of_the_global_batch_as_one_process_does(world_size):
    """Every rank draws the augmentation of the whole global batch and keeps its rows: the ranks'
    batches put together are exactly the one-process batch, crops, flips, Cutout and both views.
    (One generator per rank, seeded alike, gave row j of every rank the same augmentation.)"""
    train, _ = load_dataset("synthetic")
    info = dataset_info("synthetic")
    common = dict(batch_size=64, device=torch.device("cpu"), augment=Augment(cutout_p=0.5), views=2, seed=5)
    whole = list(DeviceLoader(train, info, **common).epoch(2))
    ranks = [
        list(DeviceLoader(train, info, **common, rank=r, world_size=world_size).epoch(2)) for r in range(world_size)
    ]
    assert len(whole) == len(ranks[0]) == 2048 // 64
    for i, batch in enumerate(whole):
        for field in ("x", "x2", "y", "index"):
            assert torch.equal(torch.cat([getattr(r[i], field) for r in ranks]), getattr(batch, field)), field
    assert all(r[0].x.shape[0] == 64 // world_size for r in ranks)


def test_unaugmented_views_equal_normalized_images():
    train, _ = load_dataset("synthetic")
    info = dataset_info("synthetic")
    loader = DeviceLoader(train, info, batch_size=64, device=torch.device("cpu"), augment=None, views=2, shuffle=False)
    b = next(iter(loader.epoch(0)))
    assert torch.equal(b.x, b.x2)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(b.x, (train.images[:64].float() / 255 - mean) / std)


def test_split_indices_disjoint_and_seeded():
    tr, va = split_indices(1000, 300, 0.1, seed=5)
    assert len(va) == 100 and len(tr) == 300 and not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = split_indices(1000, 300, 0.1, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(split_indices(1000, 300, 0.1, seed=6)[1], va)
    with pytest.raises(UsageError, match="train_subset"):
        split_indices(1000, 2000, 0.0, seed=0)


def test_fashion_mnist_real_files():
    train, test = load_dataset("fashion_mnist")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))


# ------------------------------------------------------------------ files in the on-disk formats


def fake_fashion(folder, n=20, truncate_file=None, bad_label=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = rng.integers(0, 10, n)
        if bad_label:
            labels[3] = 12
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28)),
            truncate=100 if truncate_file == f"{prefix}-images" else 0,
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_fashion_mnist_from_data_dir(tmp_path):
    fake_fashion(tmp_path / "fashion-mnist")
    train, test = load_dataset("fashion_mnist", tmp_path)
    assert train.images.shape == (20, 1, 28, 28) and len(test.labels) == 20


@pytest.mark.parametrize(
    "problem, needle", [("truncate", "train-images-idx3-ubyte.gz"), ("label", "labels-idx1-ubyte.gz")]
)
def test_bad_fashion_files_name_the_file(tmp_path, problem, needle):
    fake_fashion(
        tmp_path, truncate_file="train-images" if problem == "truncate" else None, bad_label=problem == "label"
    )
    with pytest.raises(UsageError, match=needle):
        load_dataset("fashion_mnist", tmp_path)


def write_cifar(root, name, n=30, corrupt=None):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, files, key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            b"labels",
            10,
        )
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], b"fine_labels", 100
    folder.mkdir(parents=True)
    stored = {}
    for f in files:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        stored[f] = entry
        blob = pickle.dumps(entry)
        (folder / f).write_bytes(blob[: len(blob) // 2] if f == corrupt else blob)
    return stored


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_on_disk_format(tmp_path, name):
    stored = write_cifar(tmp_path, name)
    train, test = load_dataset(name, tmp_path)
    files = sorted(stored)
    first = stored["data_batch_1" if name == "cifar10" else "train"]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    assert train.images.shape == ((150 if name == "cifar10" else 30), 3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    assert train.labels[:30].tolist() == first[key]
    assert len(test.labels) == 30 and len(files) in (2, 6)


def test_corrupt_cifar_file_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10", corrupt="data_batch_3")
    with pytest.raises(UsageError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_missing_cifar_offline_says_where_to_put_files(tmp_path):
    with pytest.raises(UsageError, match=r"cifar-100-python/ folder .* into one of: .*GVR_LAB_DATA"):
        load_dataset("cifar100", tmp_path / "empty")


def test_symmetric_label_noise_flips_exactly_the_fraction_of_training_rows_to_other_classes():
    train, _ = load_dataset("synthetic")
    rows = torch.arange(0, 2048, 2)  # the rows a run trains on; the others (e.g. validation) stay clean
    noisy = with_label_noise(train, rows, 0.4, "symmetric", "synthetic", 10, seed=3)
    flipped = noisy.labels != train.labels
    assert torch.equal(noisy.clean_labels, train.labels)
    assert int(flipped[rows].sum()) == round(0.4 * len(rows)) and not flipped[1::2].any()
    assert torch.equal(noisy.labels, with_label_noise(train, rows, 0.4, "symmetric", "synthetic", 10, seed=3).labels)
    assert not torch.equal(
        noisy.labels, with_label_noise(train, rows, 0.4, "symmetric", "synthetic", 10, seed=4).labels
    )
    # the new labels are spread over the other classes, none favoured
    counts = torch.bincount((noisy.labels - train.labels)[flipped] % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * counts[1:].float().mean()


def test_asymmetric_label_noise_follows_the_documented_mapping():
    train, _ = load_dataset("synthetic")
    train = type(train)(train.images, torch.arange(2048) % 10)  # every class alike
    rows = torch.arange(2048)
    mapping = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # CIFAR-10's
    noisy = with_label_noise(train, rows, 0.5, "asymmetric", "cifar10", 10, seed=0)
    flipped = noisy.labels != train.labels
    assert set(train.labels[flipped].tolist()) == set(mapping)
    assert all(mapping[int(c)] == int(n) for c, n in zip(train.labels[flipped], noisy.labels[flipped]))
    eligible = torch.isin(train.labels, torch.tensor(list(mapping)))
    assert int(flipped.sum()) == round(0.5 * int(eligible.sum()))


@pytest.mark.slow
def test_a_noisy_run_records_the_realized_fraction_and_evaluates_on_clean_labels(tiny_config):
    from gvr_lab import train
    from gvr_lab.distributed import World
    from gvr_lab.training import DeviceSettings, build

    config = tiny_config(label_noise=0.25, epochs=1, val_split=128)
    parts = build(config, DeviceSettings.of(config, torch.device("cpu")), World())
    train_loader, evals = parts.train_loader, parts.eval_loaders
    clean, clean_test = load_dataset("synthetic")
    assert torch.equal(evals["test"].labels, clean_test.labels)
    assert torch.equal(evals["val"].labels, clean.labels[evals["val"].index])
    assert not torch.equal(train_loader.labels, clean.labels[train_loader.index])
    run = train(config)
    assert run.summary["label_noise_realized"] == pytest.approx(0.25, abs=1 / 512)
    with pytest.raises(UsageError, match=r"label_noise must be in \[0, 1\), got 1.0"):
        tiny_config(label_noise=1.0)
    with pytest.raises(UsageError, match="unknown label_noise_kind 'pairwise'"):
        tiny_config(label_noise=0.2, label_noise_kind="pairwise")
