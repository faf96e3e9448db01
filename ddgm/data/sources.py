"""Input readers: sklearn digits, an image folder, or a .npy/.npz array -> uint8 levels (N, C, H, W).

Every reader returns a :class:`SourceData`; bad input raises :class:`DataError`
(or ``FileNotFoundError``) naming the file, what was found and what was expected.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddgm.data.digits import load_digits_source
from ddgm.data.errors import DataError
from ddgm.data.params import DataParams
from ddgm.data.raw_inputs import ContentHasher, RawInputs
from ddgm.data.source_data import SourceData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")
GRAY_MODES = frozenset({"1", "L", "LA"})
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


def load_source(params: DataParams) -> SourceData:
    """Read the source named by ``params.source``."""
    if params.source == "digits":
        return load_digits_source()
    if params.path is None:
        raise DataError(f"data.path must name the input for source {params.source!r}, found None")
    if params.source == "array":
        return load_array_source(params.path)
    return load_folder_source(params.path, params.image_size, params.channels, params.skip_bad)


def load_array_source(path: str | Path) -> SourceData:
    """A .npy of uint8 images (N, H, W) or (N, H, W, C), or a .npz with ``images`` and optional ``labels``."""
    location, path = str(path), Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path} (data.path)")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DataError(f"array file {path} must end in .npy or .npz, found {suffix or 'no suffix'!r}")
    data = path.read_bytes()
    images, labels = _read_arrays(path, suffix, data)
    images = _check_images_array(path, images)
    n = len(images)
    labels = np.full(n, -1, dtype=np.int64) if labels is None else _check_labels_array(path, labels, n)
    hasher = ContentHasher()
    hasher.add(path.name, data)
    raw = RawInputs(location=location, sha256=hasher.hexdigest(), files_read=1)
    return SourceData(images=images, labels=labels, num_levels=256, raw=raw)


def _read_arrays(path: Path, suffix: str, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if suffix == ".npy":
            return np.load(io.BytesIO(data), allow_pickle=False), None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
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
    (not PNG/JPEG content, truncated, more than 8 bits per channel) raise a DataError, or with
    ``skip_bad`` are skipped with a warning and listed in ``skipped``. ``raw`` records the content
    hash of every image file and the files read, skipped (with the reason) and ignored.
    """
    location, root = str(path), Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (data.path)")
    files, class_names, ignored = _list_image_files(root)
    hasher = ContentHasher()
    arrays, labels, names, skipped = [], [], [], []
    for file, label in files:
        relative = file.relative_to(root).as_posix()
        data = file.read_bytes()
        hasher.add(relative, data)
        try:
            arrays.append(_read_image(data, channels, image_size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if not skip_bad:
                raise DataError(f"cannot read image {file}: {exc} (set data.skip_bad to skip bad files)") from exc
            warnings.warn(f"skipping unreadable image {file}: {exc}", stacklevel=2)
            skipped.append({"file": relative, "reason": str(exc)})
            continue
        labels.append(label)
        names.append(file)
    if not arrays:
        raise DataError(f"no readable images in folder {root}: all {len(files)} image files were bad")
    _check_same_size(arrays, names)
    if any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    raw = RawInputs(location, hasher.hexdigest(), files_read=len(arrays), skipped=skipped, ignored=ignored)
    return SourceData(
        images=np.stack(arrays),
        labels=np.asarray(labels, dtype=np.int64),
        num_levels=256,
        class_names=class_names,
        skipped=[entry["file"] for entry in skipped],
        raw=raw,
    )


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _other_files(root: Path, directories: list[Path]) -> list[str]:
    """Visible files in ``directories`` that are not images, relative to ``root`` (not inputs: ignored)."""
    return sorted(
        p.relative_to(root).as_posix()
        for d in directories
        for p in d.iterdir()
        if p.is_file() and not p.name.startswith(".") and not _is_image_file(p)
    )


def _list_image_files(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None, list[str]]:
    """(file, label) pairs in sorted order, the class names (None for a flat folder), and the ignored files."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    top_images = [p for p in entries if _is_image_file(p)]
    if not class_dirs:
        if not top_images:
            raise DataError(
                f"no images found in folder {root}: expected {'/'.join(IMAGE_SUFFIXES)} files "
                f"or one subfolder of them per class"
            )
        return [(p, -1) for p in top_images], None, _other_files(root, [root])
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
    return files, [d.name for d in class_dirs], _other_files(root, [root, *class_dirs])


def _read_image(data: bytes, channels: int | None, image_size: int | None) -> np.ndarray:
    """Decode one PNG/JPEG fully (so truncated files fail here) -> uint8 (C, H, W).

    Raises ValueError for content that is not PNG/JPEG and for modes with more than 8 bits per
    channel (16-bit or float images), which an 8-bit conversion would clip.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ValueError("not a PNG or JPEG image (its content is not a recognised image format)") from None
    with img:
        img.load()
        if img.mode not in GRAY_MODES | COLOUR_MODES:
            raise ValueError(f"image mode {img.mode} has more than 8 bits per channel; expected 8-bit grey or colour")
        colour = img.mode not in GRAY_MODES
        converted = img.convert("RGB" if (channels or (3 if colour else 1)) == 3 else "L")
    if image_size is not None:
        converted = _resize_center_crop(converted, image_size)
    array = np.asarray(converted, dtype=np.uint8)
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
