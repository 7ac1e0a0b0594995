# Two commands: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs; torch is pinned to the wheels on local disk.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m si_compress.demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -ra

bench: venv
	$(BIN)/python benchmarks/bench_separability.py

clean:
	rm -rf $(VENV) runs .pytest_cache
