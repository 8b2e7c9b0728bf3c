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

Not checked: an eval batch larger than the eval split. The eval stream yields short
last batches and ranks left without any join the others' forwards with a dummy
image (``pretrain.evaluate``), so every eval batch size works on every split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from data_tools.manifest import INFO_FILE, read_info, read_split
from pretrain.config import ConfigError
from pretrain.data.order import default_streams


@dataclass(frozen=True)
class Manifest:
    """One split of a shard directory, as its ``_info.json`` (and ``classes.json``) describe it."""

    key: str
    """Config key of the directory, e.g. ``data.train_shards``."""
    split_key: str
    """Config key of the split, e.g. ``data.train_split``."""
    directory: Path
    split: str
    shards: list[Path]
    lengths: list[int]
    num_classes: Optional[int]
    """Classes of the dataset (``classes.json``, else the split's class counts); None when neither says."""

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def describe(self) -> str:
        """``split 'train' of DIR/_info.json (data.train_shards)``, for messages."""
        return f"split {self.split!r} of {self.directory / INFO_FILE} ({self.key})"


@dataclass(frozen=True)
class Manifests:
    """The manifests a run reads: train always (the order needs its shard lengths), eval where it has one."""

    train: Manifest
    eval: Optional[Manifest]
    """None without evaluation or when ``data.eval_shards`` is a pattern, a list or remote (no manifest)."""


def _local_dir(spec: Any) -> Optional[Path]:
    """``spec`` as a local directory, or None for patterns, lists and remote URLs."""
    if not isinstance(spec, str) or not spec or spec.startswith("pipe:") or "://" in spec:
        return None
    path = Path(spec)
    return path if path.is_dir() else None


def _class_count(directory: Path, split: str, classes: Optional[list[str]]) -> Optional[int]:
    if classes is not None:
        return len(classes)
    counts = read_info(directory)["splits"][split].get("stats", {}).get("class_counts")
    return max(map(int, counts)) + 1 if counts else None


def read_manifest(directory: Path, split: str, which: str) -> Manifest:
    """Split ``split`` of ``directory`` for the ``which`` (``train`` / ``eval``) keys; ConfigError if unusable."""
    key, split_key = f"data.{which}_shards", f"data.{which}_split"
    try:
        files = read_split(directory, split)
    except FileNotFoundError as exn:
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
    train_dir = _local_dir(data.train_shards)
    spec = data.train_shards
    if isinstance(spec, str) and (spec.startswith("pipe:") or "://" in spec):
        raise ConfigError(f"data.train_shards={spec!r}: training reads samples by byte offset from a file system "
                          "(local disk or a parallel file system); pipe: and object-storage URLs are not supported "
                          "for training yet: copy the shard directory first (e.g. `aws s3 sync s3://BUCKET/PREFIX "
                          "DIR`) and point data.train_shards at DIR")
    if train_dir is None:
        raise ConfigError(f"data.train_shards={data.train_shards!r} must be a shard directory with {INFO_FILE}: "
                          "the train order is computed from its shard lengths (`python -m data_tools convert` "
                          "writes it)")
    eval_dir = _local_dir(data.eval_shards)
    return Manifests(read_manifest(train_dir, data.train_split, "train"),
                     read_manifest(eval_dir, data.eval_split, "eval") if eval_dir else None)


# ------------------------------------------------------------------ checks


def check_shards_exist(cfg: Any, manifests: Manifests, world_size: int) -> None:
    """Every shard a manifest lists is on disk (a partial copy fails here, not in a loader worker)."""
    for manifest in filter(None, (manifests.train, manifests.eval)):
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
        sample_table([str(path) for path in train.shards], train.lengths, cfg.data.cache_dir)
    except ValueError as exn:  # StaleIndexError, or a shard that is no readable tar (data_tools.index)
        raise ConfigError(f"data.train_shards: {exn}") from None


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
