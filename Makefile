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

DEMO_DATA ?= data/shapes

demo: install
	# Stage 1 on the embedded default: generate the shapes dataset, then shard it.
	$(PY) launch/make_shapes.py --out $(DEMO_DATA) --train 200 --val 50 --size 256 --seed 0
	$(PY) launch/build_shards.py --annotations $(DEMO_DATA)/annotations/instances_train.json \
		--images $(DEMO_DATA)/images/train --out $(DEMO_DATA)/shards/train --shard-size 50 --workers 2
	$(PY) launch/build_shards.py --annotations $(DEMO_DATA)/annotations/instances_val.json \
		--images $(DEMO_DATA)/images/val --out $(DEMO_DATA)/shards/val --shard-size 25 --workers 2
	$(PY) -m pipeline.config configs/shapes_r18_cpu.yaml > $(DEMO_DATA)/demo_config.yaml
	@echo "Shards and manifests are in $(DEMO_DATA)/shards; the resolved demo config is in $(DEMO_DATA)/demo_config.yaml."
	@echo "Training and evaluation are not wired into the demo yet: they land with their own issues."

clean:
	rm -rf build *.egg-info ops/*.so
