"""Typed run configuration: one dataclass per component, composed by a root config.

Why typed dataclasses and not a free dict: a typo in a week-long run's YAML
(``optim.weight_decy``) must fail in the first second with the file, the key and
the nearest valid key, not silently train with a default. The same strict
loader serves both stages; ``finetune`` composes its own root from these pieces.

Precedence is CLI ``section.key=value`` > YAML file > dataclass defaults. The
resolved config round-trips through YAML (``dump_config`` / ``load_config``),
so the copy written into the run directory and each checkpoint rebuilds the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration file, override or combination of settings is invalid."""

    @classmethod
    def of(cls, errors: list[str]) -> "ConfigError":
        """One error as its one line (the commands print ``config error: <line>``, exit 2); several as
        ``invalid config (N problems):`` and an indented line each, so that one run names them all."""
        if len(errors) == 1:
            return cls(errors[0])
        return cls(f"invalid config ({len(errors)} problems):\n  " + "\n  ".join(errors))


@dataclass
class RunConfig:
    """Identity and location of a run."""

    name: str = "vit"
    """Run name; the default run directory is ``runs/<name>``."""
    dir: str = ""
    """Run directory (TensorBoard logs, resolved config, checkpoints). Empty: ``runs/<name>``."""
    seed: int = 0
    """Seeds weights, the data stream (with epoch, rank and worker) and augmentation."""

    @property
    def path(self) -> Path:
        return Path(self.dir or f"runs/{self.name}")


@dataclass
class ModelConfig:
    """The ViT to build; passed to ``pretrain.model.build_vit``."""

    variant: str = "B/16"
    """``NAME/PATCH`` from the variant table (Ti, S, B, L, H, g), or ``custom`` with the sizes below."""
    img_size: int = 224
    num_classes: int = 21843
    pre_logits: Optional[int] = None
    """Width of the tanh pre-logits hidden layer (pretraining head); None for a linear head."""
    pool: Literal["token", "gap"] = "token"
    drop_path: float = 0.0
    head_bias: float = 0.0
    """Initial classifier bias; big_vision uses -10 with the sigmoid loss."""
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    patch_size: Optional[int] = None
    grad_checkpointing: bool = False
    """Recompute each block in backward: less activation memory, about 30% more compute."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_vit`` (size overrides only where set)."""
        kwargs: dict[str, Any] = dict(
            img_size=self.img_size,
            num_classes=self.num_classes,
            pre_logits=self.pre_logits,
            pool=self.pool,
            drop_path=self.drop_path,
            head_bias=self.head_bias,
        )
        for key in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        return kwargs

    def resolved_patch_size(self) -> int:
        if self.patch_size is not None:
            return self.patch_size
        _, _, patch = self.variant.partition("/")
        if not patch.isdigit():
            raise ConfigError(
                f"model.variant={self.variant!r} has no patch size: write it as NAME/PATCH "
                "(e.g. B/16) or set model.patch_size"
            )
        return int(patch)


@dataclass
class DataConfig:
    """Shards, batching and augmentation of the input streams."""

    train_shards: Union[str, list[str]] = ""
    """A shard directory with ``_info.json``, local or on object storage (``s3://BUCKET/PREFIX``,
    ``gs://...``, ``https://...``; extras ``vitscale[s3]``, ``[gcs]``, ``[http]``; an S3-compatible
    endpoint through ``AWS_ENDPOINT_URL``). The train order needs ``_info.json``'s shard lengths."""
    train_split: str = "train"
    """Split read from ``_info.json`` when ``train_shards`` is a directory."""
    eval_shards: Union[str, list[str]] = ""
    """Like ``train_shards``, or also a brace pattern (``shards/val-{000000..000009}.tar``), a list
    of shards or a ``pipe:`` command (read front to back); empty disables evaluation."""
    eval_split: str = "val"
    global_batch_size: int = 4096
    """Images per optimizer step over all processes (DeepSpeed ``train_batch_size``)."""
    micro_batch_size: Union[int, Literal["auto"]] = 64
    """Images per process per forward (DeepSpeed ``train_micro_batch_size_per_gpu``);
    gradient accumulation = global / (micro x world size). ``auto``: the largest power of two
    dividing ``global / world`` that fits the device, probed at start (``pretrain.micro_batch``)."""
    eval_batch_size: int = 0
    """Per-process eval batch; 0 uses ``micro_batch_size``."""
    num_workers: int = 4
    """DataLoader worker processes per rank; the train order does not depend on it."""
    streams: int = 0
    """Canonical streams ``C`` of the train order (``pretrain/data/order``): a step takes
    ``global_batch_size / C`` samples from each, and a run resumes exactly on any world size
    dividing ``C``. 0: ``C = global_batch_size``, so every world size the batch allows reproduces it."""
    loader_memory_mb: int = 4096
    """Bound on the train loader's memory per rank, in MiB: decoded micro-batches in flight
    (workers x prefetch depth, the depth derived from this bound) plus one encoded sample
    and decode buffers per worker. Logged at start. The sample table (12 bytes a train sample)
    is one memory-mapped file per node, outside this bound."""
    cache_dir: str = ""
    """Node-local folder for what training derives from the shards: the train split's sample
    table, indexes of shards that have none beside them (a dataset folder is never written),
    and with remote train shards the shard cache (``pretrain/data/shard_cache.py``).
    Empty: ``<tempdir>/vitscale-cache-<uid>``. One table per dataset is kept."""
    cache_limit_bytes: int = 64 * 2**30
    """Remote train shards: bytes of whole shards the node's cache may hold; shards no process
    reads are evicted least recently used first. Checked before launch against the node's
    working set (``data.window_samples``)."""
    window_samples: int = 0
    """Window mode of the train order (``pretrain/data/order``): each stream reads its region in
    windows of this many consecutive samples, so a rank reads at most ``2 x streams per rank x
    (1 + ceil((window - 1) / shortest shard))`` shards at a time (for object storage and its
    node-local cache). 0: the default order, whole regions at once."""
    log_keys: bool = False
    """Append the ``__key__`` of every train sample to ``<run.dir>/data_keys/rank-<RANK>.jsonl``,
    one line per optimizer step."""
    shuffle_buffer: int = 5000
    """Unused: the train order is a permutation (``pretrain/data/order``), not a buffer shuffle.
    Still accepted so that recipes written before it load."""
    decode: Literal["cpu", "cpu_full", "gpu"] = "cpu"
    """Where train JPEGs are decoded. ``cpu``: in the loader workers, at a reduced DCT scale where
    the crop keeps its resolution (``pretrain/data/transforms.py``); ``cpu_full``: in the workers, always
    at full scale; ``gpu``: workers hand over the encoded bytes and each crop, the training process
    decodes the micro-batch with nvJPEG and crops on the device (``pretrain/data/decode.py``). The same
    samples and crops on every path; pixels differ slightly between them (README)."""
    randaugment: Optional[list[int]] = None
    """RandAugment ``[num_ops, magnitude]``, e.g. ``[2, 10]``; None disables it."""
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Scale range of the inception-style RandomResizedCrop."""
    hflip: bool = True
    normalize: Literal["imagenet", "inception"] = "imagenet"
    """``imagenet`` mean/std, or ``inception`` to map pixels to [-1, 1] (big_vision)."""
    eval_crop_pct: float = 0.875
    """Center crop fraction at eval: 0.875 = resize 256 then crop 224; 1.0 = resize to the crop size."""
    mixup: float = 0.0
    """MixUp alpha; 0 disables."""
    cutmix: float = 0.0
    """CutMix alpha; 0 disables."""

    def decode_errors(self) -> list[str]:
        """Settings the chosen decode path cannot honour."""
        if self.decode == "gpu" and self.randaugment is not None:
            return [f"data.decode=gpu does not run RandAugment (data.randaugment={self.randaugment}): use "
                    "data.decode=cpu with RandAugment, or data.randaugment=null with the GPU decode path"]
        return []


@dataclass
class OptimConfig:
    """Optimizer and loss."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases, the class token or pos-embed."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    """SGD momentum (finetuning)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """Softmax cross-entropy, or big_vision's sigmoid cross-entropy for ImageNet-21k."""
    label_smoothing: float = 0.0
    max_nonfinite_steps: int = 10
    """A NaN/inf loss skips the update; this many in a row stop the run."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step."""

    total_steps: int = 100_000
    warmup_steps: int = 10_000
    decay: Literal["cosine", "linear"] = "cosine"
    min_lr: float = 0.0
    """Learning rate reached at ``total_steps``."""


@dataclass
class DeepSpeedConfig:
    """Engine settings; the DeepSpeed JSON config is derived from these, never hand-kept."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to CPU memory (stages 1-3)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged last, for settings vitscale does not model."""
    universal_timeout_min: float = 120.0
    """Resuming on another world size: how long ranks wait for rank 0 to convert the checkpoint
    to a universal one (``benchmarks/universal_convert.py`` measures the rate)."""


@dataclass
class DistributedConfig:
    """The process group both stages start (pretraining itself, finetuning through Accelerate)."""

    timeout_min: float = 30.0
    """How long a collective waits for every rank before the job fails (torch's default is 10 min for
    NCCL): long enough for one rank's slow start (a first ``torch.compile`` of a big model, reading a
    large checkpoint) while the others wait in a barrier, short enough that a dead rank ends the job."""


@dataclass
class CheckpointConfig:
    """When to save and how many to keep."""

    every_steps: int = 1000
    """Save every this many optimizer steps; 0: only at the end (and on preemption or a non-finite stop)."""
    keep_last: int = 3
    resume: bool = True
    """Resume from the latest complete checkpoint in the run directory if one exists."""


@dataclass
class EvalConfig:
    """Periodic evaluation on ``data.eval_shards``."""

    every_steps: int = 0
    """0: evaluate only at the end."""
    max_batches: int = 0
    """Limit per evaluation (0: the whole eval set, exact counts)."""


@dataclass
class ProbeDataset:
    """A labelled shard directory (``python -m data_tools convert``) the representation monitors read."""

    shards: str = ""
    """Shard directory with ``_info.json``; its train split gives the few-shot images and the kNN bank."""
    train_split: str = "train"
    val_split: str = "val"
    """Scored split: every sample of it, spread over the ranks."""
    shots: Optional[list[int]] = None
    """Shot counts for this dataset (e.g. ``[1, 5, 10]`` for Flowers' 10 train images a class); None: the section's."""


def probe_datasets(specs: dict[str, Any], where: str) -> dict[str, ProbeDataset]:
    """``name: DIR`` or ``name: {shards: DIR, train_split, val_split, shots}`` entries, strictly loaded."""
    parsed = {}
    for name, spec in specs.items():
        dataset = ProbeDataset()
        _merge(dataset, {"shards": spec} if isinstance(spec, str) else spec, "config", f"{where}.{name}.")
        parsed[str(name)] = dataset
    return parsed


@dataclass
class FewShotConfig:
    """big_vision's few-shot linear probe on pre-logits features (``pretrain/fewshot``)."""

    datasets: dict[str, Any] = field(default_factory=dict)
    """``name: DIR`` or ``name: {shards: DIR, train_split: train, val_split: val, shots: [...]}``; empty: off."""
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    seeds: int = 3
    """Draws of the few-shot images per shot count; figures are the mean and spread over them."""
    l2: float = 1024.0
    """Ridge penalty (big_vision's 2^10), used as is when ``l2_grid`` is empty."""
    l2_grid: list[float] = field(default_factory=list)
    """Candidate penalties (e.g. ``[64, 128, 256, 512, 1024]``): the best on a held-out part of the
    few-shot images (a fifth of each class, at least one) is refitted on all of them; 1 shot uses ``l2``."""
    every_steps: int = 0
    """Probe every this many optimizer steps; 0: only at the end."""
    batch_size: int = 0
    """Images per process per forward; 0: ``data.eval_batch_size`` or ``data.micro_batch_size``."""

    def parsed(self) -> dict[str, ProbeDataset]:
        return probe_datasets(self.datasets, "eval.fewshot.datasets")


@dataclass
class KnnConfig:
    """DINO's weighted k-nearest-neighbour monitor on pre-logits features (``pretrain/fewshot/knn.py``)."""

    datasets: dict[str, Any] = field(default_factory=dict)
    """As ``eval.fewshot.datasets``; a name in both must have the same entry (its features are shared)."""
    k: int = 20
    temperature: float = 0.07
    bank_per_class: int = 100
    """Train images a class in the neighbour bank (drawn once, seed 0); 0: the whole train split."""
    every_steps: int = 0
    """Every this many optimizer steps; 0: only at the end."""

    def parsed(self) -> dict[str, ProbeDataset]:
        return probe_datasets(self.datasets, "eval.knn.datasets")


@dataclass
class PretrainEvalConfig(EvalConfig):
    """Pretraining's evaluation: top-1/top-5 on ``data.eval_shards`` plus the representation monitors."""

    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)

    def errors(self) -> list[str]:
        """Settings the monitors cannot run with (paths and class counts are ``pretrain.preflight``'s)."""
        fewshot, knn = self.fewshot, self.knn
        errors = []
        try:
            shots = {name: d.shots or fewshot.shots for name, d in fewshot.parsed().items()}
            both = set(fewshot.datasets) & set(knn.datasets)
            errors += [f"eval.knn.datasets.{name} differs from eval.fewshot.datasets.{name}: one name, one dataset"
                       for name in sorted(both) if fewshot.parsed()[name] != knn.parsed()[name]]
            knn.parsed()
        except ConfigError as exn:
            return [str(exn)]
        errors += [f"eval.fewshot shots for {name} must be positive, got {counts}"
                   for name, counts in shots.items() if not counts or min(counts) < 1]
        checks = [("eval.fewshot.seeds", fewshot.seeds, fewshot.seeds >= 1, "at least 1"),
                  ("eval.fewshot.l2", fewshot.l2, fewshot.l2 > 0, "positive"),
                  ("eval.fewshot.l2_grid", fewshot.l2_grid, all(v > 0 for v in fewshot.l2_grid), "positive values"),
                  ("eval.knn.k", knn.k, knn.k >= 1, "at least 1"),
                  ("eval.knn.temperature", knn.temperature, knn.temperature > 0, "positive"),
                  ("eval.knn.bank_per_class", knn.bank_per_class, knn.bank_per_class >= 0, "0 or more"),
                  ("eval.fewshot.every_steps", fewshot.every_steps, fewshot.every_steps >= 0, "0 or more"),
                  ("eval.knn.every_steps", knn.every_steps, knn.every_steps >= 0, "0 or more"),
                  ("eval.fewshot.batch_size", fewshot.batch_size, fewshot.batch_size >= 0, "0 or more")]
        errors += [f"{key}={value} must be {rule}" for key, value, ok, rule in checks if not ok]
        return errors


@dataclass
class LoggingConfig:
    """TensorBoard and console output."""

    every_steps: int = 10
    """Console line every this many steps; also the longest a step's values wait on the device before
    they are read (and a stop signal before it is acted on): ``pretrain.step_window``."""
    tensorboard: bool = True
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None looks the device up in a table."""


@dataclass
class Config:
    """Root pretraining config."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Reject impossible settings before any process group starts."""
        validate_common(self, world_size, check_paths)
        errors = self.eval.errors()
        if errors:
            raise ConfigError.of(errors)


C = typing.TypeVar("C")


# ---------------------------------------------------------------- validation


def _shard_spec_missing(spec: Union[str, list[str]]) -> Optional[str]:
    """Return the first local path of a shard spec that does not exist (None if all do)."""
    if isinstance(spec, list):
        return next((p for p in spec if not p.startswith("pipe:") and not Path(p).exists()), None)
    if not spec or spec.startswith("pipe:") or "://" in spec:
        return None
    if "{" in spec:
        parent = Path(spec.split("{", 1)[0]).parent
        return None if parent.exists() else str(parent)
    return None if Path(spec).exists() else spec


def _order_errors(data: DataConfig, world_size: int) -> list[str]:
    """The train order's rules: ``streams`` divides the global batch, the world size divides ``streams``."""
    from pretrain.data.order import default_streams, valid_world_sizes

    if data.window_samples < 0:
        return [f"data.window_samples={data.window_samples} must be 0 (the default order) or a sample count"]
    streams = data.streams or default_streams(data.global_batch_size)
    if streams < 1 or data.global_batch_size % streams:
        return [f"data.streams={data.streams} must divide data.global_batch_size={data.global_batch_size} "
                "(or be 0 for the default)"]
    if streams % world_size == 0:
        return []
    valid = valid_world_sizes(streams, data.global_batch_size, data.micro_batch_size)
    return [f"world size {world_size} cannot reproduce the train order of {streams} canonical streams "
            f"(data.streams): valid world sizes are {', '.join(map(str, valid))}"
            + ("; data.streams=0 gives the global batch, which every world size the batch allows divides"
               if data.streams else "")]


def validate_common(cfg: Any, world_size: int, check_paths: bool) -> None:
    """Checks shared by every root config that has model, data, schedule and optim sections."""
    errors = []
    patch = cfg.model.resolved_patch_size()
    if cfg.model.img_size % patch:
        errors.append(
            f"model.img_size={cfg.model.img_size} is not divisible by the patch size {patch}: "
            f"use a multiple of {patch} (e.g. {cfg.model.img_size // patch * patch or patch})"
        )
    data = cfg.data
    micro = 1 if data.micro_batch_size == "auto" else data.micro_batch_size
    per_step = micro * world_size
    if micro <= 0 or data.global_batch_size % per_step:
        errors.append(
            f"data.global_batch_size={data.global_batch_size} is not divisible by "
            f"data.micro_batch_size={data.micro_batch_size} x world size {world_size} = {per_step}: "
            "set the global batch to a multiple of that, or change the micro-batch"
        )
    if micro > 0:
        errors += _order_errors(dataclasses.replace(data, micro_batch_size=micro), world_size)
    if cfg.distributed.timeout_min <= 0:
        errors.append(f"distributed.timeout_min={cfg.distributed.timeout_min} must be positive (minutes)")
    if cfg.schedule.warmup_steps > cfg.schedule.total_steps:
        errors.append(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
            f"schedule.total_steps={cfg.schedule.total_steps}"
        )
    if len(cfg.optim.betas) != 2:
        errors.append(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    if data.randaugment is not None and len(data.randaugment) != 2:
        errors.append(f"data.randaugment must be [num_ops, magnitude], got {data.randaugment}")
    errors += data.decode_errors()
    if not data.train_shards:
        errors.append("data.train_shards is empty: point it at a shard directory (python -m data_tools convert)")
    if check_paths:
        for key in ("train_shards", "eval_shards"):
            missing = _shard_spec_missing(getattr(data, key))
            if missing:
                errors.append(
                    f"data.{key}: {missing} does not exist; create shards with "
                    "`python -m data_tools convert` (or `python -m data_tools demo` for the demo)"
                )
    if errors:
        raise ConfigError.of(errors)


# ------------------------------------------------------------------ loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_YAML_BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}
"""The words YAML 1.1 (PyYAML) turns into a bool: ``mixed_precision=no`` means Accelerate's "no"."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/false (yes/on/true) as a bool
            value = next((a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS[value]), value)
        if not isinstance(value, bool) and value in args:  # True == 1: no Literal here holds a bool
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _merge(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Write a nested mapping into the dataclass tree ``obj``, strictly."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {section} is a section and needs a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(str(key), names, f"{source}: {path}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {path}"))


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _merge(cfg, nested, f"override {item!r}")
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                cls: type[C] = Config) -> C:  # type: ignore[assignment]
    """Defaults < YAML file < overrides, each checked against the dataclass types."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        _merge(cfg, data, str(path))
    return apply_overrides(cfg, overrides or [])


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: Optional[Union[str, Path]] = None) -> str:
    """The resolved config as YAML (written to ``path`` if given)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def config_from_dict(data: dict[str, Any], cls: type[C] = Config, source: str = "<dict>") -> C:  # type: ignore[assignment]
    """Rebuild a config from ``config_to_dict`` output (e.g. a checkpoint's client state)."""
    cfg = cls()
    _merge(cfg, data, source)
    return cfg
