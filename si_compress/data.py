"""Datasets for analysis: CIFAR-10/100 (torchvision), an ImageFolder tree, or scikit-learn's digits.

``load_dataset(spec)`` returns a frozen ``DatasetInfo``: a torch Dataset yielding
``(image float32 (C, H, W), label int)``, every item's label as an int64 array (read without
decoding any image), the class names, the input shape and the normalisation applied.
``balanced_indices`` draws a class-balanced sample; ``make_loader`` wraps a (sub)set in an
unshuffled DataLoader.

Normalisation presets (``normalize=None`` or ``"auto"``):

* ``cifar10``, ``cifar100`` and any ImageFolder tree: mean (0.485, 0.456, 0.406), std
  (0.229, 0.224, 0.225) on [0, 1] RGB: what the shared pretrained CIFAR ResNets were trained with.
* ``digits``: mean 0.5, std 0.5 on pixel/16 in [0, 1], i.e. inputs in [-1, 1] (zero-centred, as
  conv nets trained from scratch prefer; the data has no established convention).

``"none"`` leaves pixels in [0, 1]; ``(mean, std)`` sequences (one value per channel) override.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DataError",
    "DatasetInfo",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "available_datasets",
    "default_data_root",
    "load_dataset",
    "balanced_indices",
    "make_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5,)
DIGITS_STD = (0.5,)
#: File endings ImageFolder trees may contain (lower-case), as torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_NAMED = ("cifar10", "cifar100", "digits")
_SPLITS = ("train", "test")
_DATA_ROOT_ENV = "SI_COMPRESS_DATA"
_MAX_LISTED = 3


class DataError(ValueError):
    """A dataset could not be found, read or sampled (one-line, actionable message)."""


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """A loaded dataset and what is known about it.

    ``labels``: read-only int64 array (len(dataset),). ``input_shape``: (C, H, W) of one item.
    ``normalization``: ((mean per channel), (std per channel)) applied to [0, 1] pixels, or None.
    """

    name: str
    split: str
    dataset: Dataset
    labels: np.ndarray
    class_names: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, int, int]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def available_datasets() -> list[str]:
    """Dataset names ``load_dataset`` knows besides an ImageFolder path."""
    return list(_NAMED)


def default_data_root() -> Path:
    """Where torchvision datasets live: ``$SI_COMPRESS_DATA`` or ``~/.cache/si_compress/data``."""
    env = os.environ.get(_DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "si_compress" / "data"


# --------------------------------------------------------------------------- normalisation


def _resolve_normalization(normalize, preset, channels: int):
    """((mean...), (std...)) or None from the user's ``normalize`` argument."""
    if normalize is None or (isinstance(normalize, str) and normalize.lower() == "auto"):
        return preset
    if isinstance(normalize, str):
        if normalize.lower() == "none":
            return None
        raise DataError(f"normalize must be 'auto', 'none' or a (mean, std) pair; got {normalize!r}")
    try:
        mean, std = normalize
        mean = tuple(float(v) for v in np.atleast_1d(np.asarray(mean, dtype=float)))
        std = tuple(float(v) for v in np.atleast_1d(np.asarray(std, dtype=float)))
    except (TypeError, ValueError):
        raise DataError(f"normalize must be 'auto', 'none' or a (mean, std) pair; got {normalize!r}") from None
    # A single value applies to every channel.
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if len(mean) != channels or len(std) != channels:
        raise DataError(
            f"normalize needs 1 or {channels} mean/std values (one per channel); got {len(mean)} and {len(std)}"
        )
    if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
        raise DataError(f"normalize needs finite means and positive stds; got mean={mean}, std={std}")
    return mean, std


def _image_transform(norm):
    from torchvision import transforms  # lazy: keeps `import si_compress.data` light

    steps = [transforms.ToTensor()]
    if norm is not None:
        steps.append(transforms.Normalize(norm[0], norm[1]))
    return transforms.Compose(steps)


def _frozen_labels(values) -> np.ndarray:
    labels = np.asarray(values, dtype=np.int64).reshape(-1)
    labels.setflags(write=False)
    return labels


# --------------------------------------------------------------------------- loaders


def _check_split(split) -> str:
    if split not in _SPLITS:
        raise DataError(f"split must be 'train' or 'test'; got {split!r}")
    return split


def _load_digits(split: str, normalize) -> DatasetInfo:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # 0..16 integer intensities -> [0, 1]
    y = bunch.target.astype(np.int64)
    # Fixed stratified 70/30 split so "test" never overlaps "train" across runs and machines.
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.3, random_state=0, stratify=y
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    norm = _resolve_normalization(normalize, (DIGITS_MEAN, DIGITS_STD), 1)
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (n, 1, 8, 8)
    if norm is not None:
        x = (x - norm[0][0]) / norm[1][0]
    labels = _frozen_labels(y[idx])
    ds = TensorDataset(x.contiguous(), torch.from_numpy(labels.copy()))
    names = tuple(str(int(c)) for c in bunch.target_names)
    return DatasetInfo(
        name="digits", split=split, dataset=ds, labels=labels, class_names=names, num_classes=len(names),
        input_shape=(1, 8, 8), normalization=norm,
        description=f"scikit-learn digits ({split}, stratified 70/30 split, seed 0): {len(idx)} images 1x8x8, 10 classes",
    )


def _load_cifar(name: str, split: str, root, download: bool, normalize) -> DatasetInfo:
    from torchvision import datasets

    root = default_data_root() if root is None else Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data root {root} is a file, not a directory; pass a folder with --data-root")
    norm = _resolve_normalization(normalize, (IMAGENET_MEAN, IMAGENET_STD), 3)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=(split == "train"), download=download, transform=_image_transform(norm))
    except RuntimeError as exc:
        if not download:
            raise DataError(
                f"{name} not found under {root}; pass --download (download=True) to fetch it there, "
                "or --data-root (root=...) to point at a folder that has it"
            ) from None
        raise DataError(f"could not download or verify {name} into {root}: {exc}") from None
    except OSError as exc:  # network failures surface as URLError (an OSError) and friends
        raise DataError(f"could not download {name} into {root} ({type(exc).__name__}: {exc}); "
                        "check the network or place the extracted data there and pass --data-root") from None
    labels = _frozen_labels(ds.targets)
    names = tuple(ds.classes)
    return DatasetInfo(
        name=name, split=split, dataset=ds, labels=labels, class_names=names, num_classes=len(names),
        input_shape=(3, 32, 32), normalization=norm,
        description=f"{name.upper()} {split} ({root}): {len(labels)} images 3x32x32, {len(names)} classes",
    )


def _rgb_loader(path: str, size: tuple[int, int] | None = None, first: str = ""):
    """Open an image as RGB; decoding failures become a DataError naming the file (also raised
    from DataLoader workers, which re-raise the same exception type). ``size``: the (width, height)
    every image must have (images are stacked into batches), that of the tree's ``first`` image."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            img = img.convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); remove or replace the file") from None
    if size is not None and img.size != size:
        raise DataError(f"image {path} is {img.size[0]}x{img.size[1]} but {first} is {size[0]}x{size[1]}: "
                        "the images of one tree must share a size; resize them to one size")
    return img


def _scan_image_tree(root: Path) -> list[str]:
    """Class folder names after checking every file has an image extension (no decoding)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; an ImageFolder tree needs {root}/<class>/<image> files"
        )
    bad: list[str] = []
    empty: list[str] = []
    for c in classes:
        n_images = 0
        for dirpath, dirnames, filenames in os.walk(root / c):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.startswith("."):
                    continue  # .DS_Store and friends: hidden, not data
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    n_images += 1
                else:
                    bad.append(os.path.join(dirpath, f))
        if n_images == 0:
            empty.append(c)
    if bad:
        more = f" (+{len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        raise DataError(
            f"{root} contains {len(bad)} non-image file(s): {', '.join(bad[:_MAX_LISTED])}{more}; "
            f"move them out of the tree (accepted: {', '.join(IMAGE_EXTENSIONS)})"
        )
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty[:_MAX_LISTED])} under {root} contain no images; "
            "remove empty class folders or add images"
        )
    return classes


def _load_image_folder(path: Path, split: str, normalize, require_splits: bool = False) -> DatasetInfo:
    import functools

    from PIL import Image
    from torchvision import datasets

    if not path.exists():
        raise DataError(f"dataset path not found: {path} (expected cifar10, cifar100, digits or an ImageFolder directory)")
    if not path.is_dir():
        raise DataError(f"{path} is a file; pass an ImageFolder directory ({path.name} is not a dataset tree)")
    root = path
    if (path / "train").is_dir() or (path / "test").is_dir():
        root = path / split
        if not root.is_dir():
            raise DataError(f"{path} has train/ or test/ subfolders but no {split}/; pass the split that exists")
    elif require_splits:
        raise DataError(f"{path} has no train/ and test/ subfolders, so the same images would serve for both; "
                        f"split them into {path}/train/<class>/ and {path}/test/<class>/")
    _scan_image_tree(root)
    norm = _resolve_normalization(normalize, (IMAGENET_MEAN, IMAGENET_STD), 3)
    try:
        ds = datasets.ImageFolder(str(root), transform=_image_transform(norm), loader=_rgb_loader)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot read ImageFolder tree {root}: {exc}") from None
    # Items are collated into batches, so all images should share the first one's size; the
    # header read here does not decode pixels.
    first = ds.samples[0][0]
    try:
        with Image.open(first) as img:
            w, h = img.size
    except Exception as exc:
        raise DataError(f"cannot decode image {first} ({type(exc).__name__}: {exc}); remove or replace the file") from None
    # Every image is checked against the first one's size as it is read: a mismatch names the file
    # instead of failing later in batch collation with no name.
    ds.loader = functools.partial(_rgb_loader, size=(w, h), first=first)
    labels = _frozen_labels(ds.targets)
    names = tuple(ds.classes)
    return DatasetInfo(
        name=str(path), split=split, dataset=ds, labels=labels, class_names=names, num_classes=len(names),
        input_shape=(3, int(h), int(w)), normalization=norm,
        description=f"ImageFolder {root}: {len(labels)} images 3x{h}x{w}, {len(names)} classes",
    )


def load_dataset(spec, *, split: str = "test", root=None, download: bool = False, normalize=None,
                 require_splits: bool = False) -> DatasetInfo:
    """Load ``spec``: ``'cifar10'``, ``'cifar100'``, ``'digits'`` or a path to an ImageFolder tree.

    A tree with ``train/`` and ``test/`` subfolders is read at ``split``; a tree without them is
    used whole whatever ``split`` says, unless ``require_splits`` (a caller that needs distinct
    train and test images): then it is a DataError. ``root`` (CIFAR only)
    defaults to ``default_data_root()``; nothing is downloaded unless ``download=True``.
    ``normalize``: None/'auto' (preset, see module doc), 'none', or (mean, std). To load a folder
    literally named like a dataset, pass it as a path such as ``./digits``.
    """
    split = _check_split(split)
    if isinstance(spec, str) and spec.strip().lower() in _NAMED:
        name = spec.strip().lower()
        if name == "digits":
            return _load_digits(split, normalize)
        return _load_cifar(name, split, root, bool(download), normalize)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if isinstance(spec, str) and not path.exists() and os.sep not in spec and not spec.startswith("."):
            raise DataError(
                f"unknown dataset {spec!r}: not one of {', '.join(_NAMED)} and no such directory"
            )
        return _load_image_folder(path, split, normalize, require_splits)
    raise DataError(f"dataset must be a name ({', '.join(_NAMED)}) or a directory path; got {spec!r}")


# --------------------------------------------------------------------------- sampling


def balanced_indices(labels, n_samples: int, *, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of a class-balanced sample of ``n_samples`` items.

    Each class gets ``n_samples // C`` items, the remainder going one each to the first classes in
    sorted-label order; a class with fewer items gives all it has and the shortfall is spread over
    the others. The same labels and seed give the same indices. Raises DataError if
    ``n_samples`` exceeds the dataset or any class would end with fewer than 2 items (the
    separation index needs a same-class neighbour).
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be 1-D (n_samples,); got shape {arr.shape}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise DataError(f"n_samples must be a positive integer; got {n_samples!r}")
    n_samples = int(n_samples)
    if n_samples > arr.shape[0]:
        raise DataError(f"requested {n_samples} samples but the dataset has only {arr.shape[0]}; lower --n-samples")
    classes, codes = np.unique(arr, return_inverse=True)
    codes = codes.reshape(-1)
    available = np.bincount(codes, minlength=len(classes))
    alloc = np.zeros(len(classes), dtype=np.int64)
    remaining = n_samples
    # Water-filling: share equally among classes that still have items left.
    while remaining > 0:
        open_ = np.flatnonzero(alloc < available)
        share = remaining // len(open_)
        if share == 0:
            alloc[open_[:remaining]] += 1
            break
        give = np.minimum(share, available[open_] - alloc[open_])
        alloc[open_] += give
        remaining -= int(give.sum())
    if alloc.min() < 2:
        worst = int(np.argmin(alloc))
        need = 2 * len(classes)
        reason = (f"it has only {available[worst]} item(s)" if available[worst] < 2
                  else f"use n_samples >= {need}")
        raise DataError(
            f"a balanced sample of {n_samples} gives class {classes[worst].tolist()!r} only {alloc[worst]} item(s); "
            f"every class needs at least 2 ({reason})"
        )
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(codes == c), size=int(k), replace=False) for c, k in enumerate(alloc)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def make_loader(dataset, indices=None, *, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """Unshuffled DataLoader over ``dataset`` (a Dataset or DatasetInfo), optionally restricted to
    ``indices`` in the given order. Batches are (images (B, C, H, W), labels (B,)).

    An ImageFolder image that fails to decode raises DataError naming the file while iterating;
    with ``num_workers > 0`` PyTorch re-raises it as DataError with the worker's traceback added.
    """
    if isinstance(dataset, DatasetInfo):
        dataset = dataset.dataset
    for name, v, lo in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise DataError(f"{name} must be an integer >= {lo}; got {v!r}")
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise DataError(f"indices must be a 1-D integer array; got shape {idx.shape}, dtype {idx.dtype}")
        n = len(dataset)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataError(f"indices must lie in [0, {n}); got values from {idx.min()} to {idx.max()}")
        dataset = Subset(dataset, idx.tolist())
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers))
