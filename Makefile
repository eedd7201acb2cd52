# Two commands do all the set-up on a fresh machine:
#   make demo   -> installs into .venv, runs the embedded T-SPIN vs SPIN vs SFT demo on CPU (writes runs/demo)
#   make test   -> installs into .venv, runs the test suite (Triton kernels through TRITON_INTERPRET=1)
# TORCH_SPEC pins the CPU build that lies on the CI machines; on a GPU machine use `make TORCH_SPEC=torch ...`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu lint bench-cpu bench-gpu plots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tspin demo --out runs/demo

test: install
	@TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# On a GPU machine, from an environment that already has CUDA torch and this package installed.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
