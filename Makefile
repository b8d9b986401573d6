# Two commands do all set-up: `make run` (the main job on configs/digits.yaml) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= digits
# torch's CPU build: PyPI's `torch` is the multi-GB CUDA build. A local wheel of it (pip's find-links) is used
# when there is one, without asking any index; else it comes from this index.
TORCH := torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: venv run test test-fast bench serve inspect clean

$(BIN)/aselect: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, the CPU build (constraints.txt pins it): a local wheel, else TORCH_INDEX. An index that cannot
	# be reached is not asked when a local wheel is there (pip retries one for minutes before giving up).
	$(BIN)/pip install --quiet --no-index --no-deps '$(TORCH)' 2>/dev/null \
		|| $(BIN)/pip install --quiet '$(TORCH)' --index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet '$(TORCH)'  # its dependencies (for a local wheel), from the configured indexes
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'  # torch is already the pinned build: kept
	touch $@

venv: $(BIN)/aselect

run: venv
	$(BIN)/aselect run $(CONFIG)

# The test files run in 2 processes (pytest-xdist: each file whole in one process, files with slow tests first;
# each process has its own Prefect test server and one torch thread). TEST_PROCS=0: one process (README,
# Development).
TEST_PROCS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder --durations 10

test: venv
	$(BIN)/ruff check .
	$(PYTEST)

# The suite without the slow end-to-end tests (kills, real servers and clusters, the benchmark run).
test-fast: venv
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

# Every selector against the exhaustive oracle, then the defaults chosen leave-one-config-out; regenerates
# bench/results.json and docs/results.md. BENCH_CONFIGS: nine configs of both backbone families (three MMDiT);
# measured whole they take about four hours on 2 CPU cores (pretraining included); `aselect bench` with no
# configs adds mnist32. Pretrained backbones and finished configs are cached in the workdir (an interrupted run
# resumes without redoing them). BENCH_REUSE=bench/results.json takes the configs already in that file as they
# are and measures only the others (the page names the run that measured each). BENCH_FLAGS= also measures scaling.
BENCH_CONFIGS ?= digits digits-noisy digits-mmdit textures-mmdit digits-latent-mmdit shapes textures digits-latent mnist5k
BENCH_FLAGS ?= --no-scaling
BENCH_REUSE ?=
bench: venv
	$(BIN)/aselect bench $(BENCH_CONFIGS) $(BENCH_FLAGS) $(addprefix --reuse ,$(BENCH_REUSE)) --readme docs/results.md

# A local Prefect server (SQLite under PREFECT_HOME) on 127.0.0.1, the process work pool, every
# deployment in prefect.yaml, and a worker. Stop with Ctrl-C. Then, in another shell:
#   PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api .venv/bin/prefect deployment run 'aselect-pipeline/digits'
PREFECT_PORT ?= 4200
serve: venv
	@export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api; \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & server=$$!; \
	trap "kill $$server" EXIT INT TERM; \
	until $(BIN)/python -c "import urllib.request as u; u.urlopen('$$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; do sleep 1; done; \
	$(BIN)/prefect work-pool create aselect-local --type process --overwrite >/dev/null; \
	$(BIN)/prefect --no-prompt deploy --all; \
	$(BIN)/prefect worker start --pool aselect-local

inspect: venv
	$(BIN)/aselect inspect

clean:
	rm -rf aselect-work
