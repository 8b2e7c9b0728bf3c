#!/usr/bin/env bash
# `make gpu-check`: the whole product on one GPU, offline, in at most 10 minutes on one H100.
#
#   make gpu-check                      # or: PYTHON=python3 launch/gpu_check.sh
#
# What it runs (launch/gpu_check.py): demo shards -> demo pretraining on NCCL in bf16 with ZeRO-2,
# SIGKILL after a checkpoint and a resume whose losses must match -> the same with ZeRO-3 ->
# export -> finetuning in bf16 at twice the resolution -> evaluation -> finetune.predict on the
# GPU -> no host sync of ours inside a step (launch/step_sync_check.py) -> benchmarks/train_step.py, ViT-B/16
# at 224 in bf16 (img/s, MFU, HFU; eager, compiled, recomputation; weak scaling on >1 GPU). Any failing step
# stops it with exit status 1 and that step's output; the last line is one JSON summary.
# Without a CUDA GPU it refuses with exit status 2.
#
# Dependencies: the GPU machine needs torch (CUDA), torchvision, accelerate, timm, tensorboard,
# safetensors, pillow, numpy, pyyaml. Whatever else is missing (deepspeed, webdataset,
# braceexpand, hjson, einops, tqdm, pydantic + pydantic-core + annotated-types + typing-inspection) travels as
# wheels, and the demo shards travel built (making them needs scikit-learn + scipy, about 50 MB of
# wheels more):
#   on a machine with network, in this checkout:  make gpu-wheels   (fills ./wheels, about 6 MB,
#     and builds data/demo, whose shards are about 7 MB; GPU_PY=3.12 picks the GPU machine's
#     Python for the compiled wheel)
#   copy the checkout with wheels/ and data/demo/shards to the GPU machine; this script then
#   installs the wheels with
#     pip install --no-index --no-deps --target .gpu-site wheels/*.whl
#   and puts the checkout and .gpu-site on PYTHONPATH (nothing is downloaded, no torch pin can
#   pull another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
SITE=${GPU_SITE:-.gpu-site}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False): this check runs on a" \
    "GPU machine only; on CPU use 'make demo' and 'make test'" >&2
  exit 2
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no index, no dependencies)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("deepspeed", "webdataset", "braceexpand", "hjson", "einops", "tqdm", "pydantic", "accelerate", "timm",
                           "safetensors", "tensorboard") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu-check: missing Python packages: $missing. Build them with 'make gpu-wheels' on a machine with" \
    "network and copy wheels/ here (see the header of $0)" >&2
  exit 2
fi
exec "$PYTHON" launch/gpu_check.py "$@"
