# Orchestration only: versions live in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Rebuild when the project's metadata or native sources change; nothing otherwise.
INSTALL_INPUTS := pyproject.toml setup.py $(shell find ops -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: install lint test demo clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(INSTALL_INPUTS) | $(PY)
	$(PY) -m pip install --quiet "setuptools>=70" wheel ninja
	# torch first: DeepSpeed's setup and ours import it (hence --no-build-isolation).
	$(PY) -m pip install --quiet $$($(PY) -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(' '.join(d for d in deps if d.split('=')[0] in ('torch', 'torchvision')))")
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest

# make demo: the whole pipeline on the generated shapes dataset, on this machine's CPUs.
# DEMO_OUT/train is the training run, DEMO_OUT/eval its evaluation, DEMO_OUT/mlflow.db the
# MLflow store of every stage and every demo run (a second `make demo` trains a new run and
# reuses the data and shards).
DEMO_DATA ?= data/shapes
DEMO_OUT ?= outputs/demo
DEMO_CONFIG ?= configs/shapes_r18_cpu.yaml
DEMO_TRAIN_IMAGES ?= 1000
DEMO_VAL_IMAGES ?= 200
DEMO_OVERRIDES ?=
DEMO_PROCS ?= 2
DEMO_MLFLOW = sqlite:///$(abspath $(DEMO_OUT))/mlflow.db
DEMO_DATA_KEYS = data.train_shards=$(DEMO_DATA)/shards/train data.val_shards=$(DEMO_DATA)/shards/val \
	tracking.uri=$(DEMO_MLFLOW) $(DEMO_OVERRIDES)
# One thread per process: two processes on two cores, no oversubscription.
TORCHRUN = OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node=$(DEMO_PROCS)

demo: install
	@mkdir -p $(DEMO_OUT)
	@if [ -f $(DEMO_DATA)/annotations/instances_val.json ]; then \
		echo "== 1/4 shapes dataset: reusing $(DEMO_DATA)"; \
	else \
		echo "== 1/4 shapes dataset -> $(DEMO_DATA)"; \
		$(PY) launch/make_shapes.py --out $(DEMO_DATA) --train $(DEMO_TRAIN_IMAGES) \
			--val $(DEMO_VAL_IMAGES) --seed 0 || exit 1; \
	fi
	@for split in train val; do \
		if [ -f $(DEMO_DATA)/shards/$$split/index.json ]; then \
			echo "== 2/4 $$split shards: reusing $(DEMO_DATA)/shards/$$split"; \
		else \
			echo "== 2/4 $$split shards -> $(DEMO_DATA)/shards/$$split"; \
			$(PY) launch/build_shards.py --annotations $(DEMO_DATA)/annotations/instances_$$split.json \
				--images $(DEMO_DATA)/images/$$split --out $(DEMO_DATA)/shards/$$split \
				--shard-size 100 --workers 2 --no-progress --tracking-uri $(DEMO_MLFLOW) || exit 1; \
		fi; \
	done
	@echo "== 3/4 training ($(DEMO_PROCS) processes, DDP on the CPU) -> $(DEMO_OUT)/train"
	@rm -rf $(DEMO_OUT)/train $(DEMO_OUT)/eval
	$(TORCHRUN) launch/train.py --config $(DEMO_CONFIG) train.output_dir=$(DEMO_OUT)/train \
		$(DEMO_DATA_KEYS)
	@echo "== 4/4 evaluation ($(DEMO_PROCS) processes) -> $(DEMO_OUT)/eval"
	$(TORCHRUN) launch/evaluate.py --config $(DEMO_CONFIG) --checkpoint $(DEMO_OUT)/train \
		--out $(DEMO_OUT)/eval $(DEMO_DATA_KEYS)
	@echo ""
	@echo "Metrics:   $(DEMO_OUT)/eval/metrics.json; in MLflow, in the training run:" \
		"$$($(PY) -c 'from pipeline.data import read_manifest as r; print(r("$(DEMO_DATA)/shards/val").name)')/segm/AP, ..."
	@echo "Pictures:  $(DEMO_OUT)/eval/pictures/"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri $(DEMO_MLFLOW)"
	@echo "Compare:   $(PY) launch/compare.py --uri $(DEMO_MLFLOW) --experiment maskrcnn --filter \"tags.stage = 'train'\""

# make gpu-check: the CUDA check for a lent GPU machine, within 8 minutes of one H100: the ops
# built against $(PYTHON)'s own torch (no venv), the CUDA op tests, the ops benchmark against
# torchvision's CUDA ops, the demo config for 100 steps in fp32/bf16/fp16 and its evaluation, and
# with 2+ GPUs DDP, DeepSpeed ZeRO-2 and a 2-process evaluation; one table at the end, also in
# GPU_CHECK_OUT/gpu-check.md. Without CUDA it says so in one line and exits 2.
# `make gpu-check GPU_CHECK_ARGS=--help` says more. Through the device tool, in one run, after
# `make gpu-wheels` here (the wheels that machine's Python lacks, into the ignored .whl/):
#   run(command="make gpu-check PYTHON=python3 GPU_CHECK_OUT=$OUT", carry=[".whl"], timeout_s=600)
GPU_CHECK_OUT ?= outputs/gpu-check
GPU_CHECK_ARGS ?=
.PHONY: gpu-check gpu-wheels

gpu-check:
	@$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --wheels .whl $(GPU_CHECK_ARGS)

gpu-wheels:
	$(PYTHON) benchmarks/gpu_check.py --download-wheels .whl

# The stamp goes too: kept, it tells the next `make` that the deleted ops are built.
clean:
	rm -rf build *.egg-info ops/*.so $(STAMP)
