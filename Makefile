# Set-up and entry points. Every target creates .venv when it is missing and installs
# the project into it, so a fresh clone needs nothing but Python >= 3.10 and make.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch keeps set-up small. Override for a GPU machine, for example
#   make test TORCH_SPEC='torch==2.13.0'  (with a CUDA index configured in pip)
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# OMP_WAIT_POLICY=PASSIVE stops idle PyTorch threads from spinning, which on a shared or
# 2-core machine takes the CPU from the thread doing the work.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/multitune demo --output-dir runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) benchmarks/gradnorm_toy.py
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
