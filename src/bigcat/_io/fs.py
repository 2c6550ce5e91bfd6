"""Local paths and object-store URLs (``s3://``, ``gs://``, ``memory://``, ``file://``) alike.

Every bigcat input and output may be an fsspec URL. Storage options (``endpoint_url``,
``anon``, credentials…) come from the standard places (AWS environment variables and
config files for S3) or are passed explicitly (``storage_options=``, ``--storage-option
key=value``) straight to fsspec.

Atomic outputs, two ways:

- local paths are written under a temporary sibling name and renamed into place;
- object stores have no rename. A Zarr store is written in place and is valid only once
  its completion marker (the root attribute ``bigcat``, written last with the
  consolidated metadata) says so — readers refuse a store without it. A single-file
  output (``.h5ad``, ``.parquet``, ``.csv``) is written to a local temporary file and
  uploaded with one PUT, which S3 makes visible all at once or not at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "filesystem",
    "is_url",
    "local",
    "name_of",
    "open_file",
    "parse_storage_options",
    "path_of",
    "suffix_of",
    "zarr_store",
]

#: bounded waits for S3 unless the caller says otherwise (botocore's defaults wait minutes)
S3_DEFAULT_CONFIG = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 3, "mode": "standard"}}
#: s3fs's own retries around each call (its default, 5, times botocore's attempts made a
#: server that stops answering hang a conversion for minutes)
S3FS_RETRIES = 2


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object (a URL with a scheme other than ``file://``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local(path: str | os.PathLike) -> Path:
    """A local path, absolute (``file://`` stripped, ``~`` expanded).

    Absolute because the path may travel to Dask workers, which resolve a relative path
    against *their* working folder: a relative input read another file there, and a
    relative output was written into the workers' folder."""
    text = str(path)
    text = text[len("file://") :] if text.startswith("file://") else text
    return Path(os.path.abspath(Path(text).expanduser()))  # noqa: PTH100 - normalizes without resolving links


def path_of(path: str | os.PathLike) -> Path | str:
    """A URL as a string, anything else as an absolute local :class:`~pathlib.Path`: how
    every input and output path is held."""
    return str(path) if is_url(path) else local(path)


def name_of(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def suffix_of(path: str | os.PathLike) -> str:
    name = name_of(path)
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _check_s3_options(url: str, options: dict) -> None:
    """Unknown s3fs options fail with one line here instead of a traceback at the first request."""
    import inspect

    import s3fs

    known = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) | {"endpoint_url"}
    fsspec_common = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous"}
    unknown = sorted(set(options) - known - fsspec_common)
    if unknown:
        msg = (
            f"{url}: unknown storage option {unknown[0]!r} for S3 (known: endpoint_url, key, secret, token, anon, "
            "profile, region via client_kwargs={'region_name': …}, config_kwargs, requester_pays, …)"
        )
        from bigcat.errors import BigcatInputError

        raise BigcatInputError(msg)


def _options(url: str, storage_options: dict | None) -> dict:
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        _check_s3_options(url, options)
        config = dict(S3_DEFAULT_CONFIG)
        config.update(options.pop("config_kwargs", {}) or {})
        options["config_kwargs"] = config
        endpoint = options.pop("endpoint_url", None)
        if endpoint:
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        options.setdefault("use_listings_cache", False)  # outputs appear while we run
    return options


def filesystem(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for a URL."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    return _bounded(fs), inner


def _bounded(fs: Any) -> Any:
    """An s3fs filesystem with its own retries bounded (see :data:`S3FS_RETRIES`)."""
    if type(fs).__module__.startswith("s3fs") and getattr(fs, "retries", 0) > S3FS_RETRIES:
        fs.retries = S3FS_RETRIES
    return fs


def zarr_store(path: str | os.PathLike, storage_options: dict | None = None, *, read_only: bool = True) -> Any:
    """What ``zarr.open_group`` and ``xarray.open_zarr`` take for ``path``: a local path string
    or an fsspec-backed Zarr store."""
    if not is_url(path):
        return str(local(path))
    from zarr.storage import FsspecStore

    url = str(path)
    store = FsspecStore.from_url(url, storage_options=_options(url, storage_options), read_only=read_only)
    _bounded(store.fs)
    return store


def exists(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
    if not is_url(path):
        return local(path).exists()
    fs, inner = filesystem(str(path), storage_options)
    return fs.exists(inner)


@contextlib.contextmanager
def open_file(path: str | os.PathLike, storage_options: dict | None = None) -> Iterator[Any]:
    """A binary file object for reading ``path`` (a local file or an object behind a URL)."""
    if not is_url(path):
        with local(path).open("rb") as handle:
            yield handle
        return
    fs, inner = filesystem(str(path), storage_options)
    with fs.open(inner, "rb") as handle:
        yield handle


def remove(path: str | os.PathLike, storage_options: dict | None = None) -> None:
    fs, inner = filesystem(str(path), storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(inner, recursive=True)


@contextlib.contextmanager
def local_copy_for_upload(url: str, storage_options: dict | None = None) -> Iterator[Path]:
    """A local temporary file; uploaded to ``url`` in one PUT when the block succeeds."""
    with tempfile.TemporaryDirectory(prefix="bigcat-upload-") as tmp:
        path = Path(tmp) / name_of(url)
        yield path
        fs, inner = filesystem(url, storage_options)
        fs.put_file(str(path), inner)


@contextlib.contextmanager
def local_folder_for_upload(url: str, storage_options: dict | None = None, *, last: str = "") -> Iterator[Path]:
    """A local temporary folder; its files are uploaded under ``url`` when the block succeeds,
    the file named ``last`` after all others (a marker readers check)."""
    with tempfile.TemporaryDirectory(prefix="bigcat-upload-") as tmp:
        folder = Path(tmp) / name_of(url)
        folder.mkdir()
        yield folder
        target, inner = filesystem(url, storage_options)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == last):
            target.put_file(str(path), f"{inner.rstrip('/')}/{path.relative_to(folder).as_posix()}")


def parse_storage_options(pairs: list[str] | None) -> dict:
    """``["endpoint_url=http://…", "anon=true"]`` → a dict (true/false/none and numbers parsed)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            from bigcat.errors import BigcatInputError

            msg = f"--storage-option {pair!r}: expected key=value"
            raise BigcatInputError(msg)
        key, value = pair.split("=", 1)
        lowered = value.lower()
        parsed: Any = value
        if lowered in ("true", "false"):
            parsed = lowered == "true"
        elif lowered in ("none", "null"):
            parsed = None
        else:
            with contextlib.suppress(ValueError):
                parsed = int(value)
        options[key.strip()] = parsed
    return options
