"""Datasets, balanced sampling and loaders (synthetic trees + digits) + the shared CIFAR-10 JPEG tree (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from si_compress.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    DatasetInfo,
    available_datasets,
    balanced_indices,
    load_dataset,
    make_loader,
)

try:
    from tests._shared import require_shared
except ImportError:  # tests/ collected as rootdir-less modules
    from _shared import require_shared


def write_tree(root, classes=("ant", "bee", "cat"), per_class=4, size=8):
    """A tiny ImageFolder tree: class c's images have constant colour 40 * (c + 1)."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            value = 40 * (c + 1)
            if i % 2:
                Image.new("RGB", (size, size), (value, value, value)).save(folder / f"{i}.png")
            else:
                Image.new("L", (size, size), value).save(folder / f"{i}.jpg", quality=95)  # grayscale -> RGB
    return root


# --------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_split():
    test = load_dataset("digits")
    train = load_dataset("digits", split="train")
    assert isinstance(test, DatasetInfo)
    assert len(test) + len(train) == 1797 and len(test) == 540
    assert test.num_classes == 10 and test.class_names == tuple(str(i) for i in range(10))
    assert test.input_shape == (1, 8, 8)
    x, y = test.dataset[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert test.labels.dtype == np.int64 and not test.labels.flags.writeable
    assert [int(test.dataset[i][1]) for i in range(len(test))] == test.labels.tolist()
    # Stratified: every class is about 30 % test.
    assert np.bincount(test.labels).min() >= 52
    # Default normalisation maps pixel/16 in [0, 1] to [-1, 1].
    assert test.normalization == ((0.5,), (0.5,))
    xs = test.dataset.tensors[0]
    assert float(xs.min()) == -1.0 and float(xs.max()) == 1.0
    # Deterministic across calls.
    assert np.array_equal(load_dataset("digits").labels, test.labels)


def test_digits_normalization_options():
    raw = load_dataset("digits", normalize="none")
    assert raw.normalization is None
    xs = raw.dataset.tensors[0]
    assert float(xs.min()) == 0.0 and float(xs.max()) == 1.0
    custom = load_dataset("digits", normalize=(0.25, 0.5))
    assert custom.normalization == ((0.25,), (0.5,))
    assert torch.allclose(custom.dataset.tensors[0], (xs - 0.25) / 0.5)
    with pytest.raises(DataError, match="normalize"):
        load_dataset("digits", normalize="imagenet")
    with pytest.raises(DataError, match="positive stds"):
        load_dataset("digits", normalize=(0.5, 0.0))
    with pytest.raises(DataError, match="1 or 1 mean/std"):
        load_dataset("digits", normalize=((0.1, 0.2), (1.0, 1.0)))


# --------------------------------------------------------------------------- ImageFolder


def test_image_folder_tree(tmp_path):
    root = write_tree(tmp_path / "tree")
    info = load_dataset(root)
    assert info.num_classes == 3 and info.class_names == ("ant", "bee", "cat")
    assert info.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert info.input_shape == (3, 8, 8)
    assert info.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    raw = load_dataset(root, normalize="none")
    x, y = raw.dataset[5]
    assert x.shape == (3, 8, 8) and y == 1
    assert torch.allclose(x, torch.full((3, 8, 8), 80 / 255), atol=2 / 255)  # grayscale JPEG became RGB
    normed, _ = info.dataset[5]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normed, (x - mean) / std, atol=1e-5)


def test_image_folder_train_test_split(tmp_path):
    write_tree(tmp_path / "ds" / "train", per_class=3)
    write_tree(tmp_path / "ds" / "test", per_class=2)
    assert len(load_dataset(tmp_path / "ds", split="train")) == 9
    assert len(load_dataset(str(tmp_path / "ds"))) == 6  # split defaults to test
    write_tree(tmp_path / "only" / "train")
    with pytest.raises(DataError, match="no test/"):
        load_dataset(tmp_path / "only")


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="dataset path not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(tmp_path / "empty")
    root = write_tree(tmp_path / "noimg")
    (root / "dog").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) dog .* contain no images"):
        load_dataset(root)
    root = write_tree(tmp_path / "junk")
    (root / "bee" / "notes.txt").write_text("not an image")
    (root / "bee" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    with pytest.raises(DataError, match="1 non-image file\\(s\\): .*notes.txt; move them out"):
        load_dataset(root)
    afile = tmp_path / "file.jpg"
    afile.write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(afile)


def test_undecodable_image_raises_data_error_naming_the_file(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "bee" / "9.png").write_bytes(b"this is not a png")
    info = load_dataset(root)  # extension checks pass; decoding happens lazily
    with pytest.raises(DataError, match="cannot decode image .*9.png"):
        for _ in make_loader(info, batch_size=4):
            pass


def test_unknown_names_splits_and_missing_cifar(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        load_dataset("cifar11")
    with pytest.raises(DataError, match="split must be"):
        load_dataset("digits", split="val")
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar100", root=tmp_path, split="train")
    assert set(available_datasets()) == {"cifar10", "cifar100", "digits"}
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- sampling and loaders


def test_balanced_indices_properties():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx = balanced_indices(labels, 20, seed=3)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted and unique
    assert np.bincount(labels[idx]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(idx, balanced_indices(labels, 20, seed=3))
    assert not np.array_equal(idx, balanced_indices(labels, 20, seed=4))
    # Remainder: counts differ by at most one.
    counts = np.bincount(labels[balanced_indices(labels, 22)])
    assert counts.sum() == 22 and counts.max() - counts.min() <= 1
    # Shortfall: class 0 gives all 10 it has, the rest is spread evenly.
    counts = np.bincount(labels[balanced_indices(labels, 70)])
    assert counts.tolist() == [10, 20, 20, 20]
    assert len(balanced_indices(labels, 100)) == 100
    # Arbitrary label values.
    names = np.array(["b", "a"] * 5)
    assert sorted(names[balanced_indices(names, 4)]) == ["a", "a", "b", "b"]


def test_balanced_indices_errors():
    labels = np.repeat(np.arange(3), [1, 5, 5])
    with pytest.raises(DataError, match="class 0 only 1 item.*it has only 1"):
        balanced_indices(labels, 9)
    with pytest.raises(DataError, match="n_samples >= 6"):
        balanced_indices(np.repeat(np.arange(3), 5), 5)
    with pytest.raises(DataError, match="only 11"):
        balanced_indices(labels, 12)
    with pytest.raises(DataError, match="positive integer"):
        balanced_indices(labels, 0)
    with pytest.raises(DataError, match="1-D"):
        balanced_indices(labels.reshape(1, -1), 4)


def test_make_loader_keeps_order_and_subsets():
    info = load_dataset("digits")
    idx = balanced_indices(info.labels, 50)
    batches = list(make_loader(info, idx, batch_size=16))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    ys = torch.cat([b[1] for b in batches]).numpy()
    assert np.array_equal(ys, info.labels[idx])
    x0 = batches[0][0]
    assert x0.shape == (16, 1, 8, 8)
    assert torch.equal(x0[0], info.dataset[int(idx[0])][0])
    full = torch.cat([y for _, y in make_loader(info.dataset)]).numpy()
    assert np.array_equal(full, info.labels)
    with pytest.raises(DataError, match="indices must lie in"):
        make_loader(info, [0, len(info)])
    with pytest.raises(DataError, match="batch_size"):
        make_loader(info, batch_size=0)


# --------------------------------------------------------------------------- shared tree (slow)


@pytest.mark.slow
def test_shared_cifar10_jpeg_tree():
    tree = require_shared("data/cifar10-jpeg")
    info = load_dataset(tree, split="test")
    assert len(info) == 10_000 and info.input_shape == (3, 32, 32)
    assert info.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert np.bincount(info.labels).tolist() == [1000] * 10
    idx = balanced_indices(info.labels, 5000)
    assert np.bincount(info.labels[idx]).tolist() == [500] * 10
    x, y = next(iter(make_loader(info, idx[:8], batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == info.labels[idx[:8]].tolist()
