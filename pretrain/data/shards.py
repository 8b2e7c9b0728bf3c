"""Turn a shard spec (directory or ``s3://``/``gs://``/``https://`` prefix with ``_info.json``, brace
pattern, ``pipe:`` URL or list) into URLs.

Brace patterns and ``::``-joined lists expand with webdataset's own ``expand_urls``;
a directory is read with ``data_tools.manifest.read_split`` (one reader of ``_info.json``),
a remote prefix with ``data_tools.storage.read_info`` (its extra must be installed).

Checked once, in the launching process, before any data worker starts: an empty
list or a missing local file is a configuration error with the path in the
message, not a hang or a traceback from inside a worker hours later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from data_tools import storage
from data_tools.manifest import read_split
from pretrain.config import DataConfig
from pretrain.data.order import Order, default_streams, plan_hash


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs and, when a ``_info.json`` describes them, their sample count."""

    urls: list[str]
    num_samples: Optional[int] = None
    lengths: Optional[list[int]] = None
    """Samples per shard, from ``_info.json`` (None without one)."""


def is_remote_prefix(spec: object) -> bool:
    """A URL naming a remote shard directory (not a pattern, list or ``pipe:`` command)."""
    return (isinstance(spec, str) and storage.is_remote(spec) and not spec.startswith("pipe:")
            and "{" not in spec and "::" not in spec and not spec.endswith(".tar"))


def resolve_shards(spec: Union[str, list[str]], split: str, what: str = "data.train_shards") -> ShardSet:
    """Resolve ``spec`` and check that it names at least one shard and every local shard exists."""
    if isinstance(spec, str) and spec and not storage.is_remote(spec) and Path(spec).is_dir():
        files = read_split(spec, split)
        shards = ShardSet([str(path) for path in files.shards], sum(files.lengths), files.lengths)
    elif is_remote_prefix(spec):
        storage.require_backend(spec, what)
        files = storage.read_split(spec, split)
        shards = ShardSet(files.shards, sum(files.lengths), files.lengths)
    else:
        from webdataset.shardlists import expand_urls  # imports torch (seconds): only for patterns and lists

        items = spec if isinstance(spec, (list, tuple)) else [spec] if spec else []
        shards = ShardSet([u for item in items for u in expand_urls(item)])
    if not shards.urls:
        raise ValueError(f"{what} is empty: point it at a shard directory, a brace pattern or a list of .tar files")
    # A pattern or list of s3://, gs:// or https:// shards needs its back end like a prefix does: without it,
    # every shard would fail to open, be skipped by the eval stream, and the evaluation report 0 of 0.
    first_of_scheme: dict[str, str] = {}
    for url in shards.urls:
        if storage.is_remote(url) and not url.startswith(("pipe:", "file:")):
            first_of_scheme.setdefault(storage.scheme(url), url)
    for url in first_of_scheme.values():
        storage.require_backend(url, what)
    missing = [u for u in shards.urls if not storage.is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(shards.urls)} shards do not exist, first {missing[0]}; "
            "check the path or re-run `python -m data_tools convert`"
        )
    return shards


@dataclass(frozen=True)
class TrainData:
    """The train shards and the order over them, as every rank and ``python -m pretrain.data.order`` see them."""

    urls: list[str]
    order: Order
    plan: str
    """``plan_hash`` of shard names, lengths, global batch and streams (checked at resume)."""


def train_data(cfg: DataConfig, seed: int) -> TrainData:
    """Resolve ``data.train_shards`` (a directory with ``_info.json``: the order needs every shard's length)."""
    shards = resolve_shards(cfg.train_shards, cfg.train_split, "data.train_shards")
    if shards.lengths is None:
        raise ValueError(f"data.train_shards={cfg.train_shards!r} must be a shard directory with _info.json (local "
                         "or an s3://, gs://, https:// prefix): the train order is computed from its shard lengths "
                         "(`python -m data_tools convert` writes it)")
    streams = cfg.streams or default_streams(cfg.global_batch_size)
    order = Order(shards.lengths, cfg.global_batch_size, streams, seed, cfg.window_samples)
    names = [url.rsplit("/", 1)[-1] for url in shards.urls]
    plan = plan_hash(names, shards.lengths, cfg.global_batch_size, streams, cfg.window_samples)
    return TrainData(shards.urls, order, plan)
