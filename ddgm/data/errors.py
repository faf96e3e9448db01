"""Error type for bad data: unreadable inputs, invalid parameters, corrupt shards."""

from __future__ import annotations


class DataError(ValueError):
    """Input data or data parameters are invalid; the message names the file or parameter."""
