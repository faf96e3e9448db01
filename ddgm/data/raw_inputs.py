"""What a dataset was made from: a content hash of the raw input files and which were read, skipped or ignored.

The content hash is sha256 over one line ``<sha256 of the file's bytes>  <path relative to the input>``
per input file, in sorted path order (the format of ``sha256sum``), so it changes when any input
file is added, removed, renamed (labels come from folder names) or edited, and not otherwise.
Files that are present but not inputs (not an image suffix) are listed as ``ignored``; inputs that
could not be used (``data.skip_bad``) are listed as ``skipped`` with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


class ContentHasher:
    """Collects (relative path, bytes) of input files; ``hexdigest`` is the content hash above."""

    def __init__(self) -> None:
        self._lines: dict[str, str] = {}

    def add(self, relative_path: str, data: bytes) -> None:
        self._lines[relative_path] = f"{hashlib.sha256(data).hexdigest()}  {relative_path}\n"

    def __len__(self) -> int:
        return len(self._lines)

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self._lines):
            digest.update(self._lines[path].encode())
        return digest.hexdigest()


@dataclass
class RawInputs:
    """The manifest's ``raw_inputs`` record.

    ``location``: data.path as given (or "sklearn digits"); ``sha256``: the content hash of every
    input file (read or skipped); ``files_read``: inputs that became images; ``skipped``:
    ``{"file", "reason"}`` per input left out; ``ignored``: other files found beside the inputs.
    """

    location: str
    sha256: str
    files_read: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "files_skipped": len(self.skipped), "files_ignored": len(self.ignored)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RawInputs:
        return cls(
            location=str(record["location"]),
            sha256=str(record["sha256"]),
            files_read=int(record["files_read"]),
            skipped=[{"file": str(s["file"]), "reason": str(s["reason"])} for s in record["skipped"]],
            ignored=[str(name) for name in record["ignored"]],
        )
