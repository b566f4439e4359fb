# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates the virtual environment at .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on this project's machines 2.13.0 is the CPU build
# that lies on disk; elsewhere override, e.g. `make TORCH=torch demo` (the newest) or another pin.
TORCH ?= torch==2.13.0

.PHONY: demo test venv clean

$(BIN)/panorama: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/panorama

demo: venv
	$(BIN)/panorama demo

test: venv
	$(BIN)/python -m pytest -q --durations=12

clean:
	rm -rf $(VENV) out .pytest_cache
