# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# Pinned so that a CPU machine gets the CPU wheel instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: install
	$(BIN)/scratchlm demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
