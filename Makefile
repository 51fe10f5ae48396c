# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# Pinned so that a CPU machine gets the CPU wheel instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# llama.cpp, which the tests run the GGUF export in, compiles from source during the install: its tools only
# (no tests or examples), one job per core (unbounded jobs can exhaust memory).
LLAMA_CPP := CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
             LLAMA_CPP_BUILD_JOBS=$(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(LLAMA_CPP) $(BIN)/pip install -e ".[test]"
	touch $@

demo: install
	$(BIN)/scratchlm demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
