"""Input readers: sklearn digits, an image folder, or a .npy/.npz array -> uint8 levels (N, C, H, W).

Every reader returns a :class:`SourceData`; bad input raises :class:`DataError`
(or ``FileNotFoundError``) naming the file, what was found and what was expected.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ddgm.data.errors import DataError
from ddgm.data.params import DataParams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
DIGITS_LEVELS = 17
DIGITS_SPLIT_SIZES = {"train": 1000, "val": 350}  # the rest (447) is the test split


@dataclass
class SourceData:
    """A whole dataset in memory, before splitting and sharding."""

    images: np.ndarray  # uint8 levels in 0..num_levels-1, shape (N, C, H, W)
    labels: np.ndarray  # int64 (N,), -1 where there is no label
    num_levels: int
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # bad inputs left out (skip_bad)
    fixed_splits: dict[str, np.ndarray] | None = None  # predefined split indices, if the source has them


def load_source(params: DataParams) -> SourceData:
    """Read the source named by ``params.source``."""
    if params.source == "digits":
        return load_digits_source()
    if params.source == "array":
        return load_array_source(params.path)
    return load_folder_source(params.path, params.image_size, params.channels, params.skip_bad)


def load_digits_source() -> SourceData:
    """scikit-learn's bundled 8x8 digits (levels 0..16) with the fixed reference split 1000/350/447."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    n_train, n_val = DIGITS_SPLIT_SIZES["train"], DIGITS_SPLIT_SIZES["val"]
    splits = {
        "train": np.arange(0, n_train),
        "val": np.arange(n_train, n_train + n_val),
        "test": np.arange(n_train + n_val, len(images)),
    }
    return SourceData(
        images=images,
        labels=digits.target.astype(np.int64),
        num_levels=DIGITS_LEVELS,
        class_names=[str(name) for name in digits.target_names],
        fixed_splits=splits,
    )


def load_array_source(path: str | Path) -> SourceData:
    """A .npy of uint8 images (N, H, W) or (N, H, W, C), or a .npz with ``images`` and optional ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path} (data.path)")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DataError(f"array file {path} must end in .npy or .npz, found {suffix or 'no suffix'!r}")
    images, labels = _read_arrays(path, suffix)
    images = _check_images_array(path, images)
    n = len(images)
    labels = np.full(n, -1, dtype=np.int64) if labels is None else _check_labels_array(path, labels, n)
    return SourceData(images=images, labels=labels, num_levels=256)


def _read_arrays(path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "images" in keys:
                return npz["images"], npz["labels"] if "labels" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read array file {path}: {exc}") from exc
    raise DataError(f"array file {path} has no array named 'images'; found keys {keys}")


def _check_images_array(path: Path, images: np.ndarray) -> np.ndarray:
    if images.ndim not in (3, 4):
        raise DataError(f"images in {path} must have shape (N, H, W) or (N, H, W, C), found shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"images in {path} must have dtype uint8 (levels 0..255), found {images.dtype}")
    shape = images.shape
    if images.ndim == 3:
        images = images[:, :, :, None]
    if images.shape[3] not in (1, 3):
        raise DataError(f"images in {path} must have 1 or 3 channels on the last axis, found shape {shape}")
    if 0 in images.shape[:3]:
        raise DataError(f"array file {path} holds no images (shape {shape}); expected N, H, W >= 1")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _check_labels_array(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels in {path} must be integers of shape ({n},) to match the images, "
            f"found {labels.dtype} of shape {labels.shape}"
        )
    if labels.min() < -1:
        raise DataError(f"labels in {path} must be >= 0 (or -1 for unlabelled), found {labels.min()}")
    return labels.astype(np.int64)


def load_folder_source(
    path: str | Path, image_size: int | None = None, channels: int | None = None, skip_bad: bool = False
) -> SourceData:
    """PNG/JPEG images in a folder, either all at the top level (no labels) or one subfolder per class.

    Class labels are indices into the sorted subfolder names. Images are converted to grayscale
    (``channels=1``) or RGB (``channels=3``); with ``channels=None`` all become RGB if any image is
    colour. Alpha is dropped. With ``image_size`` the shorter side is resized to it (Lanczos) and
    the centre square cropped; without it all images must have the same size. Unreadable images
    raise a DataError, or with ``skip_bad`` are skipped with a warning and listed in ``skipped``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (data.path)")
    files, class_names = _list_image_files(root)
    arrays, labels, names, skipped = [], [], [], []
    for file, label in files:
        try:
            arrays.append(_read_image(file, channels, image_size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if not skip_bad:
                raise DataError(f"cannot read image {file}: {exc} (set data.skip_bad to skip bad files)") from exc
            warnings.warn(f"skipping unreadable image {file}: {exc}", stacklevel=2)
            skipped.append(file.relative_to(root).as_posix())
            continue
        labels.append(label)
        names.append(file)
    if not arrays:
        raise DataError(f"no readable images in folder {root}: all {len(files)} image files were bad")
    _check_same_size(arrays, names)
    if any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return SourceData(
        images=np.stack(arrays),
        labels=np.asarray(labels, dtype=np.int64),
        num_levels=256,
        class_names=class_names,
        skipped=skipped,
    )


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _list_image_files(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(file, label) pairs in sorted order, and the class names (None for a flat folder)."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    top_images = [p for p in entries if _is_image_file(p)]
    if not class_dirs:
        if not top_images:
            raise DataError(
                f"no images found in folder {root}: expected {'/'.join(IMAGE_SUFFIXES)} files "
                f"or one subfolder of them per class"
            )
        return [(p, -1) for p in top_images], None
    if top_images:
        raise DataError(
            f"folder {root} has both images at the top level ({top_images[0].name}) and subfolders "
            f"({class_dirs[0].name}); expected either a flat folder of images or one subfolder per class"
        )
    files = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir() if _is_image_file(p))
        if not images:
            raise DataError(f"class folder {class_dir} holds no images; expected {'/'.join(IMAGE_SUFFIXES)} files")
        files += [(p, label) for p in images]
    return files, [d.name for d in class_dirs]


def _read_image(path: Path, channels: int | None, image_size: int | None) -> np.ndarray:
    """Decode one image fully (so truncated files fail here) -> uint8 (C, H, W)."""
    with Image.open(path) as img:
        img.load()
        colour = img.mode not in GRAY_MODES
        img = img.convert("RGB" if (channels or (3 if colour else 1)) == 3 else "L")
    if image_size is not None:
        img = _resize_center_crop(img, image_size)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _check_same_size(arrays: list[np.ndarray], files: list[Path]) -> None:
    first = arrays[0].shape[1:]
    for array, file in zip(arrays, files, strict=True):
        if array.shape[1:] != first:
            raise DataError(
                f"images have different sizes: {files[0]} is {first[1]}x{first[0]} but {file} is "
                f"{array.shape[2]}x{array.shape[1]} (width x height); expected all equal, or set data.image_size"
            )
