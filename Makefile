# The two commands: `make run` trains the embedded default, `make test` runs the tests.
# Both create the virtualenv first if it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Without a GPU, pin the CPU build of torch so pip never pulls a multi-GB CUDA build.
# GPU hosts keep the torch they have (TORCH= skips the pin).
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install run test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) train.py --help > /dev/null  # composes the help once and caches it: later --help answers at once
	touch $@

run: install
	$(PY) train.py $(ARGS)

# Triton kernels run on the CPU interpreter where there is no GPU.
test: install
	TRITON_INTERPRET=$(if $(shell command -v nvidia-smi 2>/dev/null),0,1) $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src kernels tests scripts train.py

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun .pytest_cache
