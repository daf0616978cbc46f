"""Locations of data and storage: a local path, or a URI (``file:///data``, ``s3://bucket/x``, ``gs://...``).

One rule for both: local paths become absolute (Ray workers and Tune trials start in other
directories), URIs pass through untouched (Ray's ``storage_path`` takes them as they are), and data
is read through :func:`pyarrow.fs.FileSystem.from_uri`. An unknown scheme is an error naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Schemes opened only when used: constructing their filesystems may contact the service (region look-up).
_REMOTE = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az"}


class LocationError(ValueError):
    """A location that cannot be used; the message names the key, the value and the fix."""


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def absolute(location: str) -> str:
    """URIs unchanged; local paths absolute (``~`` expanded)."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def check(location: str, key: str) -> None:
    """Fail now on a URI whose scheme pyarrow does not know (remote schemes are opened when used)."""
    match = _URI.match(location)
    if match and match.group(1).lower() not in _REMOTE:
        filesystem(location, key)


def filesystem(location: str, key: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
        raise LocationError(
            f"{key}={location!r}: {error}; use a local path or a URI pyarrow can open "
            "(file:///abs/path, s3://bucket/path, gs://bucket/path, hdfs://host/path)"
        ) from None


def child(location: str, inner_path: str) -> str:
    """The location of ``inner_path`` (a path inside ``location``'s filesystem), in ``location``'s form."""
    match = _URI.match(location)
    if not match:
        return inner_path
    return f"{match.group(0)}{inner_path.lstrip('/')}" if match.group(1).lower() != "file" else f"file://{inner_path}"


def local_path(location: str, key: str) -> Path | None:
    """``location`` as a local path (a plain path or a ``file://`` URI), or None for a remote one."""
    fs, path = filesystem(location, key)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None
