"""Checks of the data a run will read, from its ``_info.json`` manifests, before any process group starts.

Why a step of its own: the train order, the eval stream and the loss read the
manifests inside every rank, after torchrun or srun has started them all, so a
train split smaller than one global batch or a misspelt eval split ended in one
traceback per rank. Whatever the config and the manifests decide is checked here
instead, in the launching process (``launch/describe.py --check``, run by
``launch/local.sh`` and ``DRY_RUN=1``) and again by each trainer before it joins a
process group (``check_config`` of both stages): a ``ConfigError`` of one line
(the value, where it came from, how to fix it), exit status 2.

A check is a function ``(cfg, manifests, world_size) -> None`` that raises
``ConfigError``; ``CHECKS`` lists them in the order they run, and the first failure
is reported. Shard-level checks (every listed shard, its index) go there too.

Object storage (``s3://``, ``gs://``, ``https://`` prefixes, ``data_tools.storage``) gets the
same checks through one listing and the manifest's few small reads, and exits 2 with
one line for what cannot work: a scheme whose extra is not installed (what to
``pip install``), ``pipe:`` URLs for training (the order reads by offset), a prefix without
``_info.json``, and a ``data.cache_limit_bytes`` below the node's working set of whole
shards (``check_cache_holds_working_set``).

Not checked: an eval batch larger than the eval split. The eval stream yields short
last batches and ranks left without any join the others' forwards with a dummy
image (``pretrain.evaluate``), so every eval batch size works on every split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Union

from data_tools import storage
from data_tools.manifest import INFO_FILE, read_info, read_split
from pretrain.config import ConfigError
from pretrain.data.order import Order, default_streams
from pretrain.data.shards import is_remote_prefix, resolve_shards


@dataclass(frozen=True)
class Manifest:
    """One split of a shard directory, as its ``_info.json`` (and ``classes.json``) describe it."""

    key: str
    """Config key of the directory, e.g. ``data.train_shards``."""
    split_key: str
    """Config key of the split, e.g. ``data.train_split``."""
    directory: Union[Path, str]
    """A local folder, or a remote prefix URL."""
    split: str
    shards: list[Union[Path, str]]
    lengths: list[int]
    num_classes: Optional[int]
    """Classes of the dataset (``classes.json``, else the split's class counts); None when neither says."""

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @property
    def remote(self) -> bool:
        return isinstance(self.directory, str)

    @cached_property
    def versions(self) -> dict[str, tuple[int, str]]:
        """Remote shards: ``sample_table.remote_versions`` of the shards, listed once for every check."""
        from pretrain.data.sample_table import remote_versions

        return remote_versions([str(url) for url in self.shards])

    def describe(self) -> str:
        """``split 'train' of DIR/_info.json (data.train_shards)``, for messages."""
        info = storage.join(self.directory, INFO_FILE) if self.remote else self.directory / INFO_FILE
        return f"split {self.split!r} of {info} ({self.key})"


@dataclass(frozen=True)
class Manifests:
    """The manifests a run reads: train always (the order needs its shard lengths), eval where it has one."""

    train: Manifest
    eval: Optional[Manifest]
    """None without evaluation or when ``data.eval_shards`` is a pattern, a list or remote (no manifest)."""


def _manifest_dir(spec: Any, key: str) -> Union[Path, str, None]:
    """``spec`` as a local directory or a remote prefix (its scheme readable), or None for patterns and lists."""
    if is_remote_prefix(spec):
        try:
            storage.require_backend(spec, key)
        except ValueError as exn:
            raise ConfigError(str(exn)) from None
        return spec
    if not isinstance(spec, str) or not spec or storage.is_remote(spec):
        return None
    path = Path(spec)
    return path if path.is_dir() else None


def _info(directory: Union[Path, str]) -> dict:
    return storage.read_info(directory) if isinstance(directory, str) else read_info(directory)


def _class_count(directory: Union[Path, str], split: str, classes: Optional[list[str]]) -> Optional[int]:
    if classes is not None:
        return len(classes)
    counts = _info(directory)["splits"][split].get("stats", {}).get("class_counts")
    return max(map(int, counts)) + 1 if counts else None


def read_manifest(directory: Union[Path, str], split: str, which: str) -> Manifest:
    """Split ``split`` of ``directory`` for the ``which`` (``train`` / ``eval``) keys; ConfigError if unusable."""
    key, split_key = f"data.{which}_shards", f"data.{which}_split"
    try:
        files = storage.read_split(directory, split) if isinstance(directory, str) else read_split(directory, split)
    except OSError as exn:  # missing, or object storage refusing the read (storage.RemoteAccessError)
        raise ConfigError(f"{key}={directory}: {exn}") from None
    except KeyError as exn:
        raise ConfigError(f"{split_key}={split!r}: {exn.args[0]}: set {split_key} to one of them"
                          + (", or data.eval_shards='' to train without evaluation" if which == "eval" else "")
                          ) from None
    except (ValueError, TypeError) as exn:  # not JSON, or not timm's layout
        raise ConfigError(f"{key}={directory}: {exn}; rewrite it with `python -m data_tools convert`") from None
    manifest = Manifest(key, split_key, directory, split, files.shards, files.lengths,
                        _class_count(directory, split, files.classes))
    if not manifest.shards or not manifest.num_samples:
        raise ConfigError(f"{split_key}={split!r}: {manifest.describe()} lists {len(manifest.shards)} shards and "
                          f"{manifest.num_samples} samples: convert images into it with `python -m data_tools convert`"
                          f" or choose another split")
    return manifest


def read_manifests(data: Any) -> Manifests:
    """The train and eval manifests of ``data`` (a ``DataConfig``)."""
    spec = data.train_shards
    if isinstance(spec, str) and spec.startswith("pipe:"):
        try:
            storage.require_backend(spec, "data.train_shards")
        except ValueError as exn:
            raise ConfigError(str(exn)) from None
    train_dir = _manifest_dir(spec, "data.train_shards")
    if train_dir is None:
        raise ConfigError(f"data.train_shards={data.train_shards!r} must be a shard directory with {INFO_FILE} "
                          "(local, or an s3://, gs:// or https:// prefix): the train order is computed from its shard "
                          "lengths (`python -m data_tools convert` writes it)")
    eval_dir = _manifest_dir(data.eval_shards, "data.eval_shards")  # pipe: stays fine for eval (no manifest)
    if eval_dir is None and data.eval_shards:
        try:  # a pattern or list: its local shards exist and its remote schemes' back ends are installed
            resolve_shards(data.eval_shards, data.eval_split, "data.eval_shards")
        except (ValueError, OSError) as exn:
            raise ConfigError(str(exn)) from None
    return Manifests(read_manifest(train_dir, data.train_split, "train"),
                     read_manifest(eval_dir, data.eval_split, "eval") if eval_dir else None)


# ------------------------------------------------------------------ checks


def check_shards_exist(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """Every shard a manifest lists is on disk (a partial copy fails here, not in a loader worker)."""
    for manifest in filter(None, (manifests.train, manifests.eval)):
        if manifest.remote:
            missing = [url for url in manifest.shards if url not in manifest.versions]
        else:
            missing = [path for path in manifest.shards if not path.is_file()]
        if missing:
            raise ConfigError(f"{manifest.key}: {len(missing)} of {len(manifest.shards)} shards of "
                              f"{manifest.describe()} do not exist, first {missing[0]}: copy them there or re-run "
                              "`python -m data_tools convert`")


def check_train_fills_a_batch(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """An epoch has at least one step: ``pretrain.data.order.Order``'s steps per epoch, from the manifest."""
    data, train = cfg.data, manifests.train
    streams = data.streams or default_streams(data.global_batch_size)
    if (train.num_samples // streams) // (data.global_batch_size // streams) >= 1:
        return
    micro = 1 if data.micro_batch_size == "auto" else data.micro_batch_size
    per_step = micro * world_size
    fix = (f"lower data.global_batch_size to a multiple of {per_step} (data.micro_batch_size x world size "
           f"{world_size}) of at most {train.num_samples}" if per_step <= train.num_samples else
           f"lower data.micro_batch_size so that it times world size {world_size} is at most "
           f"{train.num_samples}, and data.global_batch_size with it")
    raise ConfigError(f"data.global_batch_size={data.global_batch_size} is more than the {train.num_samples} "
                      f"samples of {train.describe()}, so an epoch has no step: {fix}, or convert more images")


def check_num_classes(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """The head has an output for every label the data holds (a larger label fails the loss mid-run)."""
    for manifest in filter(None, (manifests.train, manifests.eval)):
        if manifest.num_classes is not None and cfg.model.num_classes < manifest.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} is less than the {manifest.num_classes} "
                              f"classes of {manifest.describe()}: set model.num_classes={manifest.num_classes}")


def check_train_indexes(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """Every train shard's index describes the shard and the manifest (``pretrain.data.sample_table``).

    Builds the node's sample table as it checks (missing indexes go into ``data.cache_dir``), so
    the ranks started next find it ready; at ImageNet-21k scale about 10 s, once per dataset state.
    """
    from pretrain.data.sample_table import sample_table

    train = manifests.train
    try:
        sample_table([str(path) for path in train.shards], train.lengths, cfg.data.cache_dir,
                     train.versions if train.remote else None)
    except (ValueError, OSError) as exn:  # StaleIndexError, or a shard that is no readable tar (data_tools.index)
        raise ConfigError(f"data.train_shards: {exn}") from None


def ranks_per_node(world_size: int) -> int:
    """Ranks sharing a node's cache: torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per node, else all ranks."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return min(world_size, int(value))
    return world_size


def check_cache_holds_working_set(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """Remote train shards: ``data.cache_limit_bytes`` holds the node's working set of whole shards.

    Working set: ranks of the node x loader workers per rank x ``Order.rank_shard_bound`` (every
    shard of the rank's regions with ``data.window_samples=0``; two windows per stream in window
    mode) x the largest shard: each worker's reader keeps up to the bound open, and workers of
    one rank read different steps, so their open copies need not coincide. Below it the cache
    would evict shards still to be read and fetch them again.
    """
    train, data = manifests.train, cfg.data
    if not train.remote:
        return
    order = Order(train.lengths, data.global_batch_size, data.streams or default_streams(data.global_batch_size),
                  0, data.window_samples)  # the seed moves no bound
    largest = max(train.versions[str(url)][0] for url in train.shards)
    ranks = ranks_per_node(world_size)
    shards = min(len(train.shards), ranks * max(1, data.num_workers) * order.rank_shard_bound(world_size))
    need = shards * largest
    if need > data.cache_limit_bytes:
        raise ConfigError(f"data.cache_limit_bytes={data.cache_limit_bytes} is less than the {need} bytes the node's "
                          f"{ranks} ranks x {max(1, data.num_workers)} loader workers may read at once ({shards} shards "
                          f"of up to {largest} bytes): raise it, or set data.window_samples (now "
                          f"{data.window_samples}) to bound the shards each stream reads at once (pretrain/data/order)")


def _split_class_counts(key: str, directory: Path, split: str) -> Optional[dict[int, int]]:
    """Images per class of one split of a monitor dataset (None when ``_info.json`` has no stats);
    ConfigError when the directory, the split or one of its shards is missing."""
    try:
        files = read_split(directory, split)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exn:
        raise ConfigError(f"{key}={directory}: {exn.args[0] if exn.args else exn}") from None
    missing = [path for path in files.shards if not path.is_file()]
    if not files.shards or not sum(files.lengths) or missing:
        raise ConfigError(f"{key}={directory}: split {split!r} lists {len(files.shards)} shards and "
                          f"{sum(files.lengths)} samples" + (f", {missing[0]} does not exist" if missing else "")
                          + ": convert the dataset with `python -m data_tools convert`")
    counts = read_info(directory)["splits"][split].get("stats", {}).get("class_counts")
    return {int(label): int(count) for label, count in counts.items()} if counts else None


def check_monitor_datasets(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """The few-shot and kNN datasets (``eval.fewshot``, ``eval.knn``) exist and have enough images a class.

    A shot count above the smallest class of the train split would stop the run at its first
    probe, hours in; the converter's class counts decide it here. Finetuning has no monitors.
    """
    from pretrain.config import PretrainEvalConfig

    if isinstance(cfg.eval, PretrainEvalConfig):
        check_monitor_data(cfg.eval)


def check_monitor_data(eval_cfg: Any) -> None:
    """``check_monitor_datasets`` for an eval section alone (``python -m pretrain.fewshot`` has no run config)."""
    fewshot = eval_cfg.fewshot
    datasets = {**eval_cfg.knn.parsed(), **fewshot.parsed()}
    for name, dataset in datasets.items():
        section = "eval.fewshot" if name in fewshot.datasets else "eval.knn"
        key = f"{section}.datasets.{name}.shards"
        counts = _split_class_counts(key, Path(dataset.shards), dataset.train_split)
        _split_class_counts(key, Path(dataset.shards), dataset.val_split)
        if name not in fewshot.datasets or counts is None:
            continue
        shots = max(dataset.shots or fewshot.shots)
        label, fewest = min(counts.items(), key=lambda item: (item[1], item[0]))
        if fewest < shots:
            raise ConfigError(f"eval.fewshot.datasets.{name}: {shots} shots need {shots} train images a class, but "
                              f"class {label} of split {dataset.train_split!r} of {dataset.shards} has {fewest}: "
                              f"give it shots: [...] of at most {fewest}")


CHECKS: tuple[Callable[[Any, Manifests, int], None], ...] = (
    check_shards_exist,
    check_train_fills_a_batch,
    check_num_classes,
    check_cache_holds_working_set,
    check_train_indexes,
    check_monitor_datasets,
)
"""Run in this order by ``preflight``; add a check here."""


def preflight(cfg: Any, world_size: int) -> Manifests:
    """Read the manifests of ``cfg.data`` and run ``CHECKS``; the first failure is raised as a ``ConfigError``.

    ``cfg`` is a root config (pretrain's or finetune's) already through its ``validate``.
    """
    manifests = read_manifests(cfg.data)
    for check in CHECKS:
        check(cfg, manifests, world_size)
    return manifests
