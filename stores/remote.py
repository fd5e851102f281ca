"""Caches and runs on object storage: any fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``).

Credentials and endpoints are never written into a store, a run, a log or a Dask graph.  They come
from where each process finds them itself: the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, or fsspec's ``FSSPEC_S3='{"key": ...}'``), fsspec's
config files, and ``--storage-option key=value``, which :func:`use_storage_options` hands to fsspec's
in-process configuration only (torchrun ranks parse the same command line; Dask workers need the
environment).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from stores.chunk_files import replace_whole
from stores.messages import first_line

#: the extra of gsae that installs each protocol's file system (`pip install 'gsae[s3]'`)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_LOCAL = ("file", "local")


def join(url: str, *parts: str) -> str:
    """``url/part/...`` for a folder or an fsspec URL."""
    return "/".join([str(url).rstrip("/"), *parts])


def write_whole(url: str, data: bytes | str) -> None:
    """Write a file (a path or an fsspec URL) so that a kill leaves either the old one or the new one,
    never half of it: a hidden temporary renamed into place on a local disk, one PUT (atomic) on object
    storage, which has no rename (fsspec's mv there is a copy and a delete).  OSError passes through."""
    fs, path = fsspec.core.url_to_fs(str(url))
    payload = data.encode() if isinstance(data, str) else data
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, payload)
        return
    folder, name = os.path.dirname(path), os.path.basename(path)
    # a temporary of this writer's own (as chunk_files' chunk writes): two processes writing one file (two
    # `gsae eval` of a run) each rename their own whole file into place, where a shared name had one
    # rename the other's away mid-write; a process id would not tell writers in other containers apart
    replace_whole(path, f"{folder}/.{name}.{uuid.uuid4().hex}.partial", payload)
    _remove_stale_temporaries(folder, name)


#: a temporary this old is a killed writer's: writing one of gsae's files takes seconds
STALE_SECONDS = 3600


#: the end of a temporary's name after ``.<file name>`` (and 7866963's pid-thread, and the older bare one)
_TEMPORARY_TAIL = r"\.(?:[0-9a-f]{32}\.|\d+-\d+\.)?partial"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_whole`'s temporaries (a writer's, running or killed)."""
    return re.fullmatch(rf"\..+{_TEMPORARY_TAIL}", name) is not None


def _remove_stale_temporaries(folder: str, name: str) -> None:
    """Remove the temporaries of ``name`` that writers killed before their rename left: those older than
    :data:`STALE_SECONDS` (gsae's before temporaries had a writer's own name among them)."""
    pattern = re.compile(rf"\.{re.escape(name)}{_TEMPORARY_TAIL}")
    try:
        entries = [entry for entry in os.listdir(folder) if pattern.fullmatch(entry)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        with contextlib.suppress(OSError):
            if now - os.stat(f"{folder}/{entry}").st_mtime > STALE_SECONDS:
                os.remove(f"{folder}/{entry}")


class RemoteError(Exception):
    """A location whose protocol cannot be used here; the message is one line."""


def is_remote(location: str) -> bool:
    return get_protocol(str(location)) not in _LOCAL


def check_protocol(location: str) -> None:
    """Raise :class:`RemoteError` saying what to install when ``location``'s file system is missing."""
    protocol = get_protocol(str(location))
    if protocol in _LOCAL:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'gsae[{extra}]'" if extra else "install the fsspec implementation for it"
        raise RemoteError(f"{location}: {protocol}:// is not available here ({first_line(exc)}); {hint}") from None


def use_storage_options(options: dict[str, Any], locations: list[str]) -> None:
    """Give ``options`` to fsspec for the protocols of ``locations`` in this process (fsspec applies its
    config as defaults whenever it makes a file system, zarr's included)."""
    for location in locations:
        check_protocol(location)
        protocol = get_protocol(str(location))
        if options and protocol not in _LOCAL:
            check_option_types(protocol, options)
            fsspec.config.conf.setdefault(protocol, {}).update(options)


#: the protocols whose file system's options take only the type of their default (s3fs); elsewhere a default
#: does not tell: gcsfs's requester_pays=False also takes the project to bill, fsspec's expiry_time=False a number
_TYPED_BY_DEFAULT = ("s3", "s3a")


def check_option_types(protocol: str, options: dict[str, Any]) -> None:
    """Raise :class:`RemoteError` for an option of s3fs that takes a boolean or a number (its default says so)
    but was given something else (null aside): ``anon=maybe`` reached s3fs as the string "maybe", which it
    takes as true, and a run then went anonymous without a word."""
    if protocol not in _TYPED_BY_DEFAULT:
        return
    parameters = inspect.signature(fsspec.get_filesystem_class(protocol).__init__).parameters
    for key, value in options.items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if value is None:
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RemoteError(f"--storage-option {key}: {value!r} is not true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RemoteError(f"--storage-option {key}: {value!r} is not a number")


_STORAGE_LIBRARIES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "adlfs", "azure")


def _from_storage_library(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _STORAGE_LIBRARIES


_WHERE_CREDENTIALS = ("credentials and endpoint come from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                      "AWS_ENDPOINT_URL, or --storage-option key=value")


def describe_storage_error(exc: BaseException, hint: str = _WHERE_CREDENTIALS) -> str | None:
    """One line for an error raised by an object-storage library (no credentials, no endpoint, access
    denied), or by a file system from one (s3fs turns a 403 into Python's PermissionError, its cause botocore's
    error: it read "an input gsae does not check, or a bug"); None for any other error.  ``hint``: where the
    credentials come from, in parentheses after it."""
    # s3fs raises what S3 refused as Python's OSError (PermissionError for a 403; a wrong region, a bad bucket
    # name, SlowDown as a plain OSError), botocore's error its cause; a missing key keeps its own messages
    translated = isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, FileExistsError))
    cause, seen = exc, 0
    while translated and cause is not None and not _from_storage_library(cause) and seen < 8:
        cause, seen = cause.__cause__, seen + 1
    if cause is None or not _from_storage_library(cause):
        return None
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return f"object storage: {type(exc).__name__}{': ' + reason if reason else ''} ({hint})"
