"""Typed config: strict loading, overrides, validation, round-trips, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def _root_class(path: Path) -> tuple[type, list[str]]:
    """Finetune recipes load into the finetune root config (weights given on the command line,
    as users do), the rest into the pretrain one."""
    if "finetune" in path.parts:
        from finetune.config import FinetuneConfig

        return FinetuneConfig, ["init=runs/pretrained/export/model.safetensors"]
    return Config, []


def test_recipes_exist() -> None:
    names = {p.relative_to(REPO / "configs").as_posix() for p in RECIPES}
    assert "pretrain/demo.yaml" in names, names
    assert "finetune/demo.yaml" in names, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_recipe_loads_and_validates(path: Path) -> None:
    cls, overrides = _root_class(path)
    cfg = load_config(path, overrides, cls=cls)
    # Paper-scale recipes point at cluster paths, so paths are not checked; the rest must hold.
    cfg.validate(world_size=1, check_paths=False)
    reloaded = config_from_dict(yaml.safe_load(dump_config(cfg)), cls=type(cfg))
    assert reloaded == cfg


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_nearest(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  weight_decy: 0.05\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "weight_decy" in msg and "'weight_decay'" in msg


def test_unknown_section_suggests_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*'model'"):
        load_config(_write(tmp_path, "modle:\n  depth: 2\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  img_size: big\n", "model.img_size: expected int, got 'big'"),
        ("optim:\n  lr: fast\n", "optim.lr: expected float"),
        ("deepspeed:\n  zero_stage: 4\n", "4 is not one of [0, 1, 2, 3]"),
        ("data:\n  hflip: 3\n", "data.hflip: expected bool"),
        ("data:\n  rrc_scale: 0.5\n", "data.rrc_scale: expected a list"),
        ("model: 3\n", "model is a section"),
    ],
)
def test_wrong_type_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_numbers_widen_and_scientific_notation_parses(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 3e-4\n  weight_decay: 0\n"))
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.weight_decay, float)


def test_precedence_cli_over_file_over_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  lr: 0.002\n  weight_decay: 0.05\n")
    cfg = load_config(path, ["optim.lr=0.004", "data.randaugment=[2, 10]", "model.pre_logits=null"])
    assert cfg.optim.lr == 0.004  # CLI beats file
    assert cfg.optim.weight_decay == 0.05  # file beats default
    assert cfg.optim.eps == Config().optim.eps  # default stays
    assert cfg.data.randaugment == [2, 10] and cfg.model.pre_logits is None


def test_yaml_bool_words_read_as_the_choice_they_spell(tmp_path: Path) -> None:
    """PyYAML reads a bare ``no`` as False: ``accelerate.mixed_precision=no`` (Accelerate's own word) and the
    same line in a recipe are the choice "no"; a bool where only numbers are allowed stays an error (True == 1)."""
    from finetune.config import FinetuneConfig

    cfg = load_config(_write(tmp_path, "accelerate:\n  mixed_precision: no\n"), ["init=w.safetensors"],
                      cls=FinetuneConfig)
    assert cfg.accelerate.mixed_precision == "no"
    cfg = load_config(None, ["init=w.safetensors", "accelerate.mixed_precision=no"], cls=FinetuneConfig)
    assert cfg.accelerate.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"True is not one of \[0, 1, 2, 3\]"):
        apply_overrides(Config(), ["deepspeed.zero_stage=true"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=abc", "expected float"),
        ("optim.weight_decy=0.1", "did you mean 'weight_decay'"),
        ("optim", "expected section.key=value"),
        ("model.pool=cls", "not one of ['token', 'gap']"),
    ],
)
def test_bad_override_rejected(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="override") as err:
        apply_overrides(Config(), [override])
    assert fragment in str(err.value)


def _valid(tmp_path: Path) -> Config:
    (tmp_path / "shards").mkdir(exist_ok=True)
    return apply_overrides(
        Config(),
        [f"data.train_shards={tmp_path / 'shards'}", "data.global_batch_size=64", "data.micro_batch_size=8"],
    )


def test_validate_accepts_consistent_config(tmp_path: Path) -> None:
    _valid(tmp_path).validate(world_size=4)


@pytest.mark.parametrize(
    "overrides, world, fragment",
    [
        (["model.img_size=200"], 1, "model.img_size=200 is not divisible by the patch size 16"),
        (["model.variant=custom", "model.patch_size=12"], 1, "not divisible by the patch size 12"),
        ([], 3, "data.global_batch_size=64 is not divisible by data.micro_batch_size=8 x world size 3"),
        (["data.eval_shards=/nonexistent/val"], 1, "data.eval_shards: /nonexistent/val does not exist"),
        (["data.train_shards=/nowhere/train-{000000..000009}.tar"], 1, "/nowhere does not exist"),
        (["schedule.warmup_steps=200000"], 1, "exceeds schedule.total_steps"),
        (["model.variant=B"], 1, "has no patch size"),
    ],
)
def test_validate_rejects_impossible_settings(tmp_path: Path, overrides: list[str], world: int,
                                              fragment: str) -> None:
    cfg = apply_overrides(_valid(tmp_path), overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=world)
    assert fragment in str(err.value)


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(_valid(tmp_path), ["deepspeed.extra={gradient_predivide_factor: 2.0}",
                                             "data.train_shards=[a.tar, b.tar]", "run.name=x"])
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_run_dir_defaults_to_runs_name() -> None:
    cfg = apply_overrides(Config(), ["run.name=abc"])
    assert cfg.run.path == Path("runs/abc")
    assert apply_overrides(cfg, ["run.dir=/tmp/x"]).run.path == Path("/tmp/x")
