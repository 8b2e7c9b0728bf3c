"""Shards on object storage: ``s3://``, ``gs://`` and ``https://`` prefixes through fsspec.

Why one module: the train order, the sample table, the shard cache, the eval stream,
``data_tools index`` and ``verify`` all need the same four things of a remote shard
directory (its ``_info.json``, a shard's size and version, a byte range, a sequential
read), and each back end comes from an optional extra. Everything that touches a URL
goes through here, so a scheme whose extra is missing fails in one place, with one line
naming what to install (``MissingBackendError``).

S3-compatible stores (MinIO, Ceph, a cloud vendor's S3 API) need no setting of ours: s3fs
and botocore read the standard ``AWS_ENDPOINT_URL`` (and ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) from the environment. ``http://`` is
accepted like ``https://`` (a test server on localhost).

Cost at ImageNet-21k scale (1,400 shards of 1 GB): listing a prefix is one request per
1,000 objects (2 for the shards, 2 more with their ``.idx`` files), so the sizes and
versions of every shard (``versions``) cost a few requests, not 1,400 HEADs. Reading a
shard front to back (``open_stream``) is one ranged GET per 32 MiB block (32 for a 1 GB shard: large
enough that transfer, not request latency, sets the rate); a byte range (``read_range``) one GET.

fsspec is imported on first use only: local training never pays for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
from functools import lru_cache
from typing import IO, Any

from .manifest import CLASSES_FILE, INFO_FILE, SplitFiles

EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
          "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}
"""URL scheme -> (module its fsspec back end needs, vitscale extra that installs it)."""


BLOCK = 32 << 20
"""Bytes per request of a sequential read: at ~1 GB/s a 32 MiB GET takes ~30 ms, about one request's latency."""


class MissingBackendError(ValueError):
    """A URL's scheme needs an optional extra that is not installed."""


class UnsupportedSchemeError(ValueError):
    """A URL scheme the train reader cannot read (``pipe:``, an unknown protocol)."""


class RemoteAccessError(OSError):
    """Object storage refused or could not serve a read (credentials, permissions, network)."""


ACCESS_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for an S3-compatible store",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
}
"""What to check per scheme when a read is refused (https:// has no credentials of ours)."""


def is_remote(url: Any) -> bool:
    """True for ``scheme://`` URLs (``file://`` included) and ``pipe:`` commands."""
    return isinstance(url, str) and ("://" in url or url.startswith("pipe:"))


def scheme(url: str) -> str:
    """``s3`` of ``s3://bucket/key``; ``pipe`` of ``pipe:cmd``."""
    return "pipe" if url.startswith("pipe:") else url.split("://", 1)[0].lower()


def require_backend(url: str, what: str = "the URL") -> None:
    """Raise a one-line error unless ``url``'s scheme is one we read and its extra is installed."""
    name = scheme(url)
    if name == "pipe":
        raise UnsupportedSchemeError(
            f"{what}={url!r}: pipe: URLs are read front to back by a shell command, but the train order reads "
            "samples by byte offset; use an s3://, gs:// or https:// prefix (pip install 'vitscale[remote]') or "
            "a local copy (e.g. `aws s3 sync s3://BUCKET/PREFIX DIR`)")
    if name not in EXTRAS:
        raise UnsupportedSchemeError(f"{what}={url!r}: the scheme {name}:// is not supported; use a local "
                                     "directory or an s3://, gs:// or https:// prefix")
    module, extra = EXTRAS[name]
    if importlib.util.find_spec("fsspec") is None or importlib.util.find_spec(module) is None:
        raise MissingBackendError(f"{what}={url!r} needs {module} for {name}:// (not installed): "
                                  f"pip install 'vitscale[{extra}]'")


@lru_cache(maxsize=None)
def _filesystem(name: str, pid: int) -> Any:
    import fsspec

    return fsspec.filesystem(name)


def filesystem(url: str) -> Any:
    """The fsspec file system of ``url``'s scheme, one instance per process and scheme (the async back ends
    are not fork-safe: a DataLoader worker gets its own)."""
    require_backend(url)
    return _filesystem(scheme(url), os.getpid())


def join(prefix: str, name: str) -> str:
    """``prefix/name`` for a URL prefix (with or without a trailing slash)."""
    return posixpath.join(prefix.rstrip("/") + "/", name)


def exists(url: str) -> bool:
    return filesystem(url).exists(url)


def read_bytes(url: str) -> bytes:
    """The whole object (small files: ``_info.json``, an index)."""
    return filesystem(url).cat_file(url)


def read_range(url: str, start: int, length: int) -> bytes:
    """``length`` bytes of ``url`` from ``start`` (one ranged GET; fewer at the end of the object)."""
    return filesystem(url).cat_file(url, start=start, end=start + length)


def open_stream(url: str) -> IO[bytes]:
    """A file object reading ``url`` front to back (shard downloads, eval, index builds), ``BLOCK`` bytes a GET."""
    return filesystem(url).open(url, "rb", block_size=BLOCK, cache_type="readahead")


def read_info(prefix: str) -> dict:
    """The parsed ``_info.json`` of a remote shard directory; FileNotFoundError naming it when absent."""
    url = join(prefix, INFO_FILE)
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist: the train order needs every shard's length; write it "
                                f"with `python -m data_tools convert SOURCE DIR` and upload DIR to {prefix}")
    except (MissingBackendError, UnsupportedSchemeError):
        raise
    except Exception as exn:  # the back end's own errors (botocore's are no OSError): one line, what to check
        hint = ACCESS_HINTS.get(scheme(url), "the URL")
        raise RemoteAccessError(f"could not read {url}: {type(exn).__name__}: {exn}; check {hint}, and the "
                                "network") from None
    info = json.loads(data)
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ValueError(f"{url} is not in timm's layout: expected {{'name', 'splits': {{split: ...}}}}")
    return info


def read_classes(prefix: str) -> list[str] | None:
    """``classes.json`` of a remote shard directory as a list indexed by label, or None when there is none."""
    try:
        data = json.loads(read_bytes(join(prefix, CLASSES_FILE)))
    except FileNotFoundError:
        return None
    if isinstance(data, dict):
        return [str(data[str(i)]) for i in range(len(data))]
    return [str(name) for name in data]


def read_split(prefix: str, split: str) -> SplitFiles:
    """``manifest.read_split`` of a remote prefix: shard URLs, samples per shard, class names (two small GETs)."""
    splits = read_info(prefix)["splits"]
    if split not in splits:
        raise KeyError(f"{join(prefix, INFO_FILE)} has no split {split!r}; it has {sorted(splits)}")
    entry = splits[split]
    return SplitFiles([join(prefix, name) for name in entry["filenames"]], [int(n) for n in entry["shard_lengths"]],
                      read_classes(prefix))


def _version(entry: dict) -> str:
    """What changes when an object is rewritten: its size and, where the store gives them, ETag or mtime."""
    tags = [str(entry.get(k)) for k in ("ETag", "etag", "generation", "LastModified", "mtime", "last_modified")
            if entry.get(k) is not None]
    return f"{entry.get('size')}:{':'.join(tags)}"


def versions(urls: list[str], missing_ok: bool = False) -> dict[str, tuple[int, str]]:
    """(size, version) of each URL, from one listing per prefix (HEAD each where a listing gives nothing).

    With ``missing_ok`` URLs that do not exist are left out, else they raise FileNotFoundError."""
    out: dict[str, tuple[int, str]] = {}
    prefixes = sorted({url.rsplit("/", 1)[0] for url in urls})
    for prefix in prefixes:
        fs = filesystem(prefix)
        fs.invalidate_cache(prefix)  # a listing cached earlier in this process may predate a rewrite
        try:
            listing = fs.ls(prefix, detail=True)
        except (FileNotFoundError, NotImplementedError):
            listing = []
        strip = fs._strip_protocol
        by_path = {strip(entry["name"]): entry for entry in listing}
        for url in urls:
            if url.rsplit("/", 1)[0] == prefix:
                entry = by_path.get(strip(url))
                if entry is None or entry.get("size") is None:  # HTML listings (https://) give no sizes
                    try:
                        entry = fs.info(url)
                    except FileNotFoundError:
                        if missing_ok:
                            continue
                        raise FileNotFoundError(f"{url} does not exist") from None
                out[url] = (int(entry["size"]), _version(entry))
    return out
