# Two commands for a fresh clone:  `make demo`  and  `make test`.
# The environment lives in .venv. TORCH_SPEC is what gets installed when the venv has no torch yet;
# the default is the CPU build that lies on disk here. To bring your own torch (e.g. a CUDA
# build), install it into .venv first (or set PYTHON to an interpreter that has it) and it is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
SMOKE_OUT ?= out

.PHONY: demo test lint docs bench clean env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

env: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,docs,examples]"

demo: env
	$(PY) examples/quickstart.py --out $(SMOKE_OUT)

lint: env
	$(PY) -m ruff check bdl gp tests examples benchmarks
	$(PY) -m ruff format --check bdl gp tests examples benchmarks

test: env lint
	$(PY) -m pytest -q --durations=15

docs: env
	$(PY) -m sphinx -W --keep-going -b html -q docs docs/_build/html

bench: env
	$(PY) -m pip install -q -e ".[benchmarks]"
	$(PY) benchmarks/bench_vbll.py

clean:
	rm -rf docs/_build out .pytest_cache
