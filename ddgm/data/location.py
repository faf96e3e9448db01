"""Where a prepared dataset lives, and how its files are opened.

A dataset location names the directory that holds ``manifest.json`` and the shards:

* a local directory path, or a ``file://`` URL of one;
* a URL prefix of that directory (``s3://bucket/shards``, ``gs://...``, ``https://host/shards``):
  file URLs are ``<prefix>/<name>``; ``http(s)`` is read with urllib, other schemes with fsspec
  (which needs the scheme's package, e.g. s3fs);
* a ``pipe:`` command containing ``{name}``, which is replaced by the file name, e.g.
  ``pipe:aws s3 cp s3://bucket/shards/{name} -``; read through webdataset's ``gopen``.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds

from ddgm.data.errors import DataError


def _scheme(location: str) -> str:
    scheme = urlparse(location).scheme
    return "" if len(scheme) <= 1 else scheme  # a one-letter "scheme" is a Windows drive


def local_dir(location: str | Path) -> Path | None:
    """The local directory of a location, or None if it is remote (URL or pipe)."""
    location = str(location)
    scheme = _scheme(location)
    if scheme == "":
        return Path(location)
    if scheme == "file":
        return Path(url2pathname(urlparse(location).path))
    return None


def file_url(location: str | Path, name: str) -> str:
    """The URL (or local path) of file ``name`` inside the dataset location."""
    location = str(location)
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise DataError(f"a pipe: dataset location must contain '{{name}}' for the file name, found {location!r}")
        return location.replace("{name}", name)
    directory = local_dir(location)
    if directory is not None:
        return str(directory / name)
    return location.rstrip("/") + "/" + name


def open_url(url: str) -> BinaryIO:
    """Open a local path or URL for binary reading (see the module docstring for the schemes)."""
    path = local_dir(url)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        return path.open("rb")
    scheme = _scheme(url)
    if scheme == "pipe":
        return wds.gopen(url, "rb")
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()

