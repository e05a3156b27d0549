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

demo: install
	@echo "Installed into $(VENV). The end-to-end demo (shapes -> shards -> train -> eval) lands with its own issue;"
	@echo "until then: $(PY) -m pipeline.config configs/shapes_r18_cpu.yaml prints the demo's resolved config."

clean:
	rm -rf build *.egg-info ops/*.so
