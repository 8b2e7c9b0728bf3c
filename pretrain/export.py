"""``python -m pretrain.export RUN_DIR [--step N] OUT``: a consolidated fp32 model that needs no DeepSpeed.

Writes ``OUT/model.safetensors`` (fp32, timm key names), ``OUT/config.json``
(``ViTConfig.to_dict()``, what ``build_vit_from_config`` takes) and, when the
run's train shards have one, ``OUT/classes.json``. The same layout as finetune's
export, so either loads with ``load_exported``.

Why consolidate: a ZeRO checkpoint holds the fp32 master weights split over the
ranks that wrote it; ``deepspeed.utils.zero_to_fp32`` merges them. Loading the
merged weights into ``build_vit_from_config`` with ``strict=True`` before writing
proves every name and shape. This module imports DeepSpeed only inside
``export``: ``load_exported`` needs torch, safetensors and ``pretrain.model`` only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from pretrain.model import VisionTransformer, build_vit_from_config

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
CLASSES = "classes.json"


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one ``step_N`` checkpoint, merged over the ranks that wrote it."""
    if zero_stage == 0:
        states = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name))


def _classes_file(run_dir: Path) -> Optional[Path]:
    """``classes.json`` next to the run's train shards, if the run's config points at a shard directory."""
    from pretrain.config import load_config

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    shards = load_config(config_file).data.train_shards
    if isinstance(shards, str) and shards and Path(shards).is_dir() and (Path(shards) / CLASSES).is_file():
        return Path(shards) / CLASSES
    return None


def export(run_dir: Union[str, Path], out: Union[str, Path], step: Optional[int] = None) -> Path:
    """Export checkpoint ``step`` (default: the latest complete one) of ``run_dir`` to ``out``."""
    from pretrain.checkpoint import CheckpointDir

    run_dir, out = Path(run_dir), Path(out)
    ckdir = CheckpointDir(run_dir / "checkpoints")
    checkpoint = ckdir.find(step)
    if checkpoint is None:
        available = ", ".join(str(c.step) for c in ckdir.complete()) or "none"
        what = f"step {step}" if step is not None else "any complete checkpoint"
        raise FileNotFoundError(f"{ckdir.root} has no {what} (complete steps: {available})")
    model = build_vit_from_config(checkpoint.meta["model"])
    state = consolidated_state_dict(checkpoint.path, checkpoint.meta.get("zero_stage", 1))
    model.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS),
              metadata={"format": "pt", "source": str(checkpoint.path)})
    (out / MODEL_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))
    classes = _classes_file(run_dir)
    if classes is not None:
        shutil.copyfile(classes, out / CLASSES)
    return out


def load_exported(directory: Union[str, Path]) -> VisionTransformer:
    """The model of an export directory (fp32, eval mode); needs no DeepSpeed."""
    directory = Path(directory)
    config = json.loads((directory / MODEL_CONFIG).read_text())
    model = build_vit_from_config(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.eval()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="pretraining run directory (with checkpoints/)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.step)
    except FileNotFoundError as exn:
        print(f"export: {exn}", file=sys.stderr)
        return 2
    print(f"exported {out / WEIGHTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
