"""Turn a shard spec (directory with ``_info.json``, brace pattern, ``pipe:`` URL or list) into URLs.

Brace patterns and ``::``-joined lists expand with webdataset's own ``expand_urls``;
a directory is read with ``data_tools.manifest.read_split`` (one reader of ``_info.json``).

Checked once, in the launching process, before any data worker starts: an empty
list or a missing local file is a configuration error with the path in the
message, not a hang or a traceback from inside a worker hours later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from webdataset.shardlists import expand_urls

from data_tools.manifest import read_split


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs and, when a ``_info.json`` describes them, their sample count."""

    urls: list[str]
    num_samples: Optional[int] = None


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def resolve_shards(spec: Union[str, list[str]], split: str, what: str = "data.train_shards") -> ShardSet:
    """Resolve ``spec`` and check that it names at least one shard and every local shard exists."""
    if isinstance(spec, (list, tuple)):
        shards = ShardSet([u for item in spec for u in expand_urls(item)])
    elif spec and not _is_remote(spec) and Path(spec).is_dir():
        files = read_split(spec, split)
        shards = ShardSet([str(path) for path in files.shards], sum(files.lengths))
    else:
        shards = ShardSet(expand_urls(spec) if spec else [])
    if not shards.urls:
        raise ValueError(f"{what} is empty: point it at a shard directory, a brace pattern or a list of .tar files")
    missing = [u for u in shards.urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(shards.urls)} shards do not exist, first {missing[0]}; "
            "check the path or re-run `python -m data_tools convert`"
        )
    return shards
