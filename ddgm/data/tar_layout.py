"""Decode a whole shard with array operations when it has the layout that ``write_split`` gives it.

``write_split`` writes, for every sample, a ``{key}.cls`` member (the label as text, under 512 bytes)
and then a ``{key}.npy`` member (one fixed .npy header + C*H*W bytes); each member is a 512-byte
ustar header followed by its data padded to a multiple of 512 bytes; zero blocks end the archive.
So sample i occupies bytes [i * stride, (i + 1) * stride) and the shard is a (count, stride) byte
array whose columns hold the pixels. ``decode_regular`` checks that layout on every sample (member
types, names, the .npy size and header, nothing but zeros after the last sample, levels < K) with
array operations, parses the labels, and returns None when anything differs, so that such a shard
goes to the generic member-by-member reader (which also gives the precise error).
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 512
NAME, SIZE, TYPE, PREFIX = slice(0, 100), slice(124, 135), 156, slice(345, 500)  # SIZE: 11 octal digits
_OCTAL_PLACES = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_MAX_LABEL_DIGITS = 18  # decimal digits that always fit in int64


def padded(size: int) -> int:
    """Bytes a member's data takes in the archive: ``size`` rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


def _sizes(headers: np.ndarray) -> np.ndarray | None:
    """The size field of every header (11 octal digits then NUL or space), or None if one is not."""
    digits = headers[:, SIZE].astype(np.int64) - ord("0")
    terminator = headers[:, SIZE.stop]
    if digits.min() < 0 or digits.max() > 7 or not ((terminator == 0) | (terminator == ord(" "))).all():
        return None
    return digits @ _OCTAL_PLACES


def _names_pair_up(cls_names: np.ndarray, npy_names: np.ndarray) -> bool:
    """Every row: ``<key>.cls`` and ``<key>.npy`` with the same key, a single dot, NUL-terminated."""
    end = (cls_names == 0).argmax(axis=1)  # 0 where there is no NUL
    if end.min() < 5:
        return False
    suffix = end[:, None] - 4 + np.arange(4)
    expected = cls_names.copy()
    np.put_along_axis(expected, suffix, np.frombuffer(b".npy", np.uint8)[None], axis=1)
    cls_suffix = np.take_along_axis(cls_names, suffix, axis=1)
    return bool((cls_suffix == np.frombuffer(b".cls", np.uint8)).all() and (npy_names == expected).all()
                and ((cls_names == ord(".")).sum(axis=1) == 1).all())


def _labels(texts: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Decimal integers (optional leading '-') held in the first ``sizes[i]`` bytes of ``texts[i]``."""
    if sizes.min() < 1 or sizes.max() > _MAX_LABEL_DIGITS:
        return None
    column = np.arange(sizes.max())
    texts = texts[:, :len(column)].astype(np.int64)
    negative = texts[:, 0] == ord("-")
    digit = (column >= negative[:, None]) & (column < sizes[:, None])
    values = texts - ord("0")
    if not (digit.sum(axis=1) > 0).all() or ((values < 0) | (values > 9))[digit].any():
        return None
    places = np.where(digit, 10 ** np.clip(sizes[:, None] - 1 - column, 0, None), 0)
    labels = (values * places).sum(axis=1)
    return np.where(negative, -labels, labels)


def decode_regular(data: bytes, count: int, image_shape: tuple[int, int, int], num_levels: int,
                   npy_header: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 levels [count, C, H, W], int64 labels [count]) of a shard in the regular layout, else None.

    ``npy_header`` is the .npy header that precedes every image's bytes. The levels are a read-only
    view into ``data``.
    """
    pixels = math.prod(image_shape)
    npy_size = len(npy_header) + pixels
    cls_span = 2 * BLOCK
    stride = cls_span + BLOCK + padded(npy_size)
    if count < 1 or len(data) < count * stride or data[count * stride:].strip(b"\0"):
        return None
    rows = np.frombuffer(data, dtype=np.uint8, count=count * stride).reshape(count, stride)
    cls_head, npy_head = rows[:, :BLOCK], rows[:, cls_span:cls_span + BLOCK]
    types = np.stack([cls_head[:, TYPE], npy_head[:, TYPE]])
    if not ((types == 0) | (types == ord("0"))).all() or cls_head[:, PREFIX].any() or npy_head[:, PREFIX].any():
        return None
    cls_sizes, npy_sizes = _sizes(cls_head), _sizes(npy_head)
    if cls_sizes is None or npy_sizes is None or (npy_sizes != npy_size).any() or cls_sizes.max() > BLOCK:
        return None
    image_start = cls_span + BLOCK + len(npy_header)
    if not (rows[:, cls_span + BLOCK:image_start] == np.frombuffer(npy_header, dtype=np.uint8)).all():
        return None
    if not _names_pair_up(cls_head[:, NAME], npy_head[:, NAME]):
        return None
    levels = rows[:, image_start:image_start + pixels].reshape(count, *image_shape)
    if num_levels < 256 and levels.max() >= num_levels:
        return None
    labels = _labels(rows[:, BLOCK:BLOCK + _MAX_LABEL_DIGITS], cls_sizes)
    return None if labels is None else (levels, labels)
