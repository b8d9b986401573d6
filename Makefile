# Two commands do all set-up: `make run` (the main job on configs/digits.yaml) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= digits
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: venv run test lint inspect clean

$(BIN)/aselect: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/aselect

run: venv
	$(BIN)/aselect run $(CONFIG)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

inspect: venv
	$(BIN)/aselect inspect

clean:
	rm -rf aselect-work
