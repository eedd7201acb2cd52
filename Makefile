# Two commands do all the set-up on a fresh machine:
#   make demo   -> installs into .venv, runs the embedded T-SPIN vs SPIN vs SFT demo on CPU (writes runs/demo)
#   make test   -> installs into .venv, runs the test suite (Triton kernels through TRITON_INTERPRET=1)
# TORCH_SPEC pins the CPU build that lies on the CI machines; on a GPU machine use `make TORCH_SPEC=torch ...`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu lint bench-cpu bench-cpu-mid bench-gpu plots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,plot]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tspin demo --out runs/demo --resume

test: install
	@TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# On a GPU machine, with the CUDA torch there (this package need not be installed: the root conftest puts it on
# the path; `datasets` may be missing). The benchmarks run with `make bench-gpu`.
test-gpu:
	@$(PYTHON) -m pytest -q tests -m gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

# Benchmarks (README "Benchmarks"). bench-cpu: tiny shapes + the host-memory benchmark, timed (one thread, for
# stable numbers on shared CPUs), results JSON under benchmarks/results/ and PNG plots next to it.
bench-cpu: install
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 TSPIN_BENCH=1 TRITON_INTERPRET=1 $(PY) -m pytest -q benchmarks -m "not gpu" -p no:cacheprovider $(BENCH_ARGS)
	$(PY) benchmarks/plot.py --markdown

# The loss paths side by side at mid-size CPU shapes (issue 17): interleaved rounds, ~30 min on a quiet machine.
bench-cpu-mid: install
	uptime
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 TSPIN_BENCH=1 $(PY) -m pytest -q benchmarks/test_loss_paths_cpu.py --runslow -k mid -p no:cacheprovider $(BENCH_ARGS)
	$(PY) benchmarks/plot.py --markdown

# On a GPU machine, like test-gpu (CUDA torch already there). PART=all, or one part (benchmarks/gpu_suite.sh).
bench-gpu:
	PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh $(or $(PART),all)

plots:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/plot.py --markdown

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
