"""Manifest checks before launch (``pretrain.preflight``): each message in-process, then through the commands users type.

The in-process tests cover every check on the demo shards and hand-written manifests
(milliseconds each); the subprocess tests run ``python -m pretrain``/``finetune`` and the
launchers once per failure kind, and assert exit status 2, a single stderr line, and that
no run directory (checkpoint, metrics) was created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fork_server import run_module

from finetune.config import FinetuneConfig
from pretrain.config import Config, ConfigError, load_config
from pretrain.preflight import CHECKS, preflight, read_manifests

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CFG = REPO / "configs" / "pretrain" / "demo.yaml"
FINETUNE_CFG = REPO / "configs" / "finetune" / "demo.yaml"
DEMO_TRAIN, DEMO_VAL = 1497, 300
"""Samples of the demo shards' splits (``data_tools.demo``)."""


@pytest.fixture(scope="module")
def odd_shards(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shard directories the checks must reject, next to each other:

    ``noinfo/`` (no ``_info.json``), ``empty/`` (split ``val`` lists no shards), ``partial/`` (the demo
    train split without its last shard file), ``nameless/`` (the demo splits, no ``classes.json``: the
    class count comes from the split's stats).
    """
    root = tmp_path_factory.mktemp("odd")
    (root / "noinfo").mkdir()
    (root / "empty").mkdir()
    (root / "empty" / "_info.json").write_text(json.dumps(
        {"name": "empty", "splits": {"val": {"name": "val", "filenames": [], "shard_lengths": [], "num_samples": 0}}}))
    for name in ("partial", "nameless"):
        shutil.copytree(demo_shards, root / name, ignore=shutil.ignore_patterns("classes.json"))
    (root / "partial" / "train-000007.tar").unlink()
    return root


def _pretrain(shards: Path, *overrides: str, eval_shards: Path | None = None) -> Config:
    return load_config(PRETRAIN_CFG, [f"data.train_shards={shards}", f"data.eval_shards={eval_shards or shards}",
                                      *overrides])


def _error(cfg, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world_size)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_demo_recipe_passes_and_reads_both_manifests(demo_shards: Path) -> None:
    manifests = preflight(_pretrain(demo_shards), 2)
    assert manifests.train.num_samples == DEMO_TRAIN and manifests.train.num_classes == 10
    assert manifests.eval is not None and manifests.eval.num_samples == DEMO_VAL and manifests.eval.split == "val"
    assert [check.__name__ for check in CHECKS] == ["check_shards_exist", "check_train_fills_a_batch",
                                                    "check_num_classes", "check_cache_holds_working_set",
                                                    "check_train_indexes", "check_monitor_datasets"]


@pytest.mark.parametrize("batch, streams, ok", [
    (1496, 0, True), (1504, 0, False),  # default streams (= batch): one step needs batch <= samples
    (1488, 16, True), (1504, 16, False),  # 16 streams of 93 samples: 93 per stream per step fit, 94 do not
])
def test_train_split_must_hold_one_global_batch(demo_shards: Path, batch: int, streams: int, ok: bool) -> None:
    cfg = _pretrain(demo_shards, f"data.global_batch_size={batch}", f"data.streams={streams}",
                    "data.micro_batch_size=8")
    if ok:
        preflight(cfg, 1)
        return
    assert _error(cfg) == (
        f"data.global_batch_size={batch} is more than the {DEMO_TRAIN} samples of split 'train' of "
        f"{demo_shards}/_info.json (data.train_shards), so an epoch has no step: lower data.global_batch_size to "
        f"a multiple of 8 (data.micro_batch_size x world size 1) of at most {DEMO_TRAIN}, or convert more images")


def test_a_micro_batch_larger_than_the_train_split_names_the_micro_batch(demo_shards: Path) -> None:
    cfg = _pretrain(demo_shards, "data.global_batch_size=2048", "data.micro_batch_size=1024")
    assert "lower data.micro_batch_size so that it times world size 2 is at most 1497" in _error(cfg, 2)


@pytest.mark.parametrize("which", ["train", "eval"])
def test_unknown_split_names_the_key_and_the_splits_there(demo_shards: Path, which: str) -> None:
    message = _error(_pretrain(demo_shards, f"data.{which}_split=nosuchsplit"))
    assert message.startswith(f"data.{which}_split='nosuchsplit': {demo_shards}/_info.json has no split "
                              "'nosuchsplit'; it has ['train', 'val']: set data." + which + "_split to one of them")
    assert ("data.eval_shards=''" in message) == (which == "eval")


def test_missing_info_empty_split_and_missing_shard_files(demo_shards: Path, odd_shards: Path) -> None:
    assert _error(_pretrain(odd_shards / "noinfo", eval_shards=demo_shards)).startswith(
        f"data.train_shards={odd_shards / 'noinfo'}: {odd_shards / 'noinfo'}/_info.json does not exist")
    assert _error(_pretrain(demo_shards, eval_shards=odd_shards / "empty")) == (
        f"data.eval_split='val': split 'val' of {odd_shards / 'empty'}/_info.json (data.eval_shards) lists 0 shards "
        "and 0 samples: convert images into it with `python -m data_tools convert` or choose another split")
    assert _error(_pretrain(odd_shards / "partial", eval_shards=demo_shards)) == (
        f"data.train_shards: 1 of 8 shards of split 'train' of {odd_shards / 'partial'}/_info.json "
        f"(data.train_shards) do not exist, first {odd_shards / 'partial'}/train-000007.tar: copy them there or "
        "re-run `python -m data_tools convert`")


def test_train_shards_must_be_a_directory_while_eval_may_be_a_pattern(demo_shards: Path) -> None:
    pattern = f"{demo_shards}/train-{{000000..000001}}.tar"
    assert "must be a shard directory with _info.json" in _error(_pretrain(demo_shards, f"data.train_shards={pattern}"))
    assert preflight(_pretrain(demo_shards, f"data.eval_shards={pattern}"), 1).eval is None
    assert preflight(_pretrain(demo_shards, "data.eval_shards="), 1).eval is None


@pytest.mark.parametrize("directory", ["demo", "nameless"])
def test_num_classes_covers_every_class_of_the_data(demo_shards: Path, odd_shards: Path, directory: str) -> None:
    """From ``classes.json``, else from the split's class counts."""
    shards = demo_shards if directory == "demo" else odd_shards / directory
    assert read_manifests(_pretrain(shards).data).eval.num_classes == 10
    preflight(_pretrain(shards, "model.num_classes=10"), 1)
    assert _error(_pretrain(shards, "model.num_classes=9")) == (
        f"model.num_classes=9 is less than the 10 classes of split 'train' of {shards}/_info.json "
        "(data.train_shards): set model.num_classes=10")


def test_finetune_config_goes_through_the_same_checks(demo_shards: Path) -> None:
    cfg = load_config(FINETUNE_CFG, [f"init={demo_shards}", f"data.train_shards={demo_shards}",
                                     f"data.eval_shards={demo_shards}", "model.num_classes=3"], cls=FinetuneConfig)
    assert _error(cfg).startswith("model.num_classes=3 is less than the 10 classes")


# ------------------------------------------------- the commands users type


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHON=sys.executable, **extra)
    return env


RANK_0_OF_2 = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
"""What torchrun gives rank 0: a trainer that got as far as its process group would wait on port 1 and fail there."""


@pytest.mark.parametrize("command, env, overrides, line", [
    (["-m", "pretrain", "--config", PRETRAIN_CFG], RANK_0_OF_2,
     ["data.global_batch_size=2048", "data.micro_batch_size=8"],
     "data.global_batch_size=2048 is more than the 1497 samples of split 'train'"),
    (["launch/local.sh", PRETRAIN_CFG, "2"], {},
     ["data.eval_split=nosuchsplit", "data.global_batch_size=8", "data.micro_batch_size=4"],
     "data.eval_split='nosuchsplit': "),
    (["launch/pretrain.sh", PRETRAIN_CFG], dict(DRY_RUN="1", SLURM_NTASKS="2"),
     ["data.train_shards={odd}/noinfo"], "data.train_shards={odd}/noinfo: {odd}/noinfo/_info.json does not exist"),
    (["-m", "finetune", "--config", FINETUNE_CFG], RANK_0_OF_2, ["model.num_classes=5"],
     "model.num_classes=5 is less than the 10 classes of split 'train'"),
    (["launch/local.sh", FINETUNE_CFG, "2"], dict(STAGE="finetune"), ["data.eval_shards={odd}/empty"],
     "data.eval_split='val': split 'val' of {odd}/empty/_info.json (data.eval_shards) lists 0 shards"),
    (["launch/finetune.sh", FINETUNE_CFG], dict(DRY_RUN="1", SLURM_NTASKS="2"),
     ["data.global_batch_size=2048", "data.micro_batch_size=16"],
     "data.global_batch_size=2048 is more than the 1497 samples"),
    (["-m", "pretrain", "--config", PRETRAIN_CFG], RANK_0_OF_2,
     ["eval.fewshot.datasets.digits={odd}/nameless", "eval.fewshot.shots=[1,200]"],
     "eval.fewshot.datasets.digits: 200 shots need 200 train images a class, but class "),
], ids=["pretrain-train-split-too-small", "local-pretrain-no-eval-split", "dry-run-pretrain-no-info",
        "finetune-num-classes", "local-finetune-empty-eval-split", "dry-run-finetune-train-split-too-small",
        "pretrain-fewshot-too-many-shots"])
def test_commands_exit_2_with_one_line_before_any_process_group(
        demo_shards: Path, odd_shards: Path, tmp_path: Path, command: list, env: dict[str, str],
        overrides: list[str], line: str) -> None:
    run_dir = tmp_path / "run"
    defaults = [f"data.train_shards={demo_shards}", f"data.eval_shards={demo_shards}", f"run.dir={run_dir}",
                *([f"init={demo_shards}"] if FINETUNE_CFG in command else [])]
    args = [str(REPO / c) if isinstance(c, str) and c.startswith("launch/") else str(c) for c in command]
    args += [*defaults, *(o.format(odd=odd_shards) for o in overrides)]
    if args[0] == "-m":  # python -m, forked from a process that imported torch once (tests/fork_server.py)
        result = run_module(*args[1:], env=_env(**env), cwd=tmp_path, timeout=120)
    else:
        result = subprocess.run(["bash", *args], cwd=tmp_path, env=_env(**env), capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    stderr = result.stderr.splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("config error: " + line.format(odd=odd_shards)), result.stderr
    assert "Traceback" not in result.stdout and "would run" not in result.stdout
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
