"""Locations of data and storage: a local path, or a URI (``file:///data``, ``s3://bucket/x``, ``gs://...``).

One rule for both: local paths become absolute (Ray workers and Tune trials start in other
directories), URIs pass through untouched (Ray's ``storage_path`` takes them as they are), and data
is read through :func:`pyarrow.fs.FileSystem.from_uri`. An unknown scheme is an error naming the key.

A remote location is opened only once its service answers a TCP connect within :data:`CONNECT_TIMEOUT_S`:
without a network, pyarrow's GCS client retries for minutes and ignores Ctrl-C. The same short check
refuses a Ray cluster address (:func:`check_ray_address`) that nothing listens on, and
:func:`check_store` a local MLflow store that does not exist (MLflow would create an empty one).

pyarrow is imported on first use: ``ssl_train.config`` imports this module and must stay light.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow.fs as pafs

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Schemes opened only when used: constructing their filesystems may contact the service (region look-up).
_REMOTE = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az"}
# The service a remote scheme's filesystem talks to when the URI names no endpoint of its own.
_SERVICES = {"s3": ("s3.amazonaws.com", 443), "gs": ("storage.googleapis.com", 443),
             "gcs": ("storage.googleapis.com", 443)}
CONNECT_TIMEOUT_S = 5.0
_answered: set[tuple[str, int]] = set()  # endpoints that answered once in this process


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
    """The pyarrow filesystem of ``location`` and the path inside it; a remote one only once its service
    answers (:func:`check_reachable`)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    check_reachable(location, key)
    try:
        return pafs.FileSystem.from_uri(location)
    except OSError as error:  # s3: the bucket's region could not be resolved
        raise LocationError(f"{key}={location!r}: {error}") from None
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
    import pyarrow.fs as pafs

    fs, path = filesystem(location, key)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None


def endpoint(location: str) -> tuple[str, int] | None:
    """The host and port a remote URI's filesystem connects to: its ``endpoint_override`` (or, for s3,
    ``AWS_ENDPOINT_URL``), an HDFS name node, an Azure account, or the cloud service; None when unknown."""
    parts = urlsplit(location)
    scheme, query = parts.scheme.lower(), parse_qs(parts.query)
    override = query.get("endpoint_override", [""])[0]
    if not override and scheme == "s3":
        override = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if override:
        target = urlsplit(override if "://" in override else f"//{override}")
        plain = (target.scheme or query.get("scheme", ["https"])[0]) == "http"
        return (target.hostname, target.port or (80 if plain else 443)) if target.hostname else None
    if scheme in ("hdfs", "viewfs"):
        return (parts.hostname, parts.port or 8020) if parts.hostname not in (None, "default") else None
    if scheme in ("abfs", "abfss"):
        return (parts.hostname, 443) if parts.hostname and "." in parts.hostname else None
    return _SERVICES.get(scheme)


def connect_problem(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``host:port`` fails within ``timeout_s`` (None when it succeeds)."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return str(error) if not isinstance(error, TimeoutError) else f"no answer within {timeout_s:g} s"
    return None


def check_reachable(location: str, key: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a remote ``location`` whose service does not answer a TCP connect within ``timeout_s`` (once per
    endpoint and process); local paths and unknown endpoints pass."""
    target = endpoint(location) if is_uri(location) else None
    if target is None or target in _answered:
        return
    problem = connect_problem(*target, timeout_s)
    if problem is not None:
        raise LocationError(f"{key}={location!r}: its service at {target[0]}:{target[1]} cannot be reached "
                            f"({problem}); check the network, or use a local path or a file:// URI")
    _answered.add(target)


def check_ray_address(address: str | None, key: str = "--address") -> None:
    """Refuse a Ray cluster address (``host:port``, ``ray://host:port``) that does not answer a TCP connect
    within :data:`CONNECT_TIMEOUT_S` (``ray.init`` would wait minutes); ``auto``, ``local`` and None pass."""
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as error:  # a port that is not a number, or out of range
        raise LocationError(f"{key} {address!r}: {error}; give host:port or ray://host:port") from None
    if not host or port is None:
        raise LocationError(f"{key} {address!r}: give host:port, ray://host:port or auto")
    problem = connect_problem(host, port)
    if problem is not None:
        raise LocationError(f"{key} {address!r}: no Ray cluster answers at {host}:{port} ({problem}); start one "
                            "(`ray start --head`) or give the address `ray start` printed")


def local_store(tracking_uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///file``, ``file:``, a plain folder); None for a
    server or an in-memory database."""
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite" and parts.path not in ("", "/", "/:memory:"):
        return Path(unquote(parts.path[1:]))  # sqlite:///relative.db, sqlite:////absolute.db
    if parts.scheme in ("", "file"):
        return Path(unquote(parts.path))
    return None


def check_store(tracking_uri: str) -> None:
    """Refuse a local MLflow store that does not exist yet: reading from it would create an empty one."""
    path = local_store(tracking_uri)
    if path is not None and not path.exists():
        raise LocationError(f"no MLflow store at '{path}' ({tracking_uri}): nothing has been tracked there; "
                            "run ssl-tune train or ssl-tune tune first, or pass --tracking-uri")
