# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates/updates the virtual environment, installing through constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo demo-library dashboard screenshot test lint format bench clean

# mmcv 2.1.0 (with C++ ops) compiles against the torch already in the venv, hence --no-build-isolation
# after the first install. A prebuilt wheel in ../shared/wheels is used when that folder exists; without
# it pip builds from source (~7 min on 2 cores) and keeps the wheel in its cache for the next venv.
SHARED_WHEELS := $(wildcard ../shared/wheels)
MMCV_FIND_LINKS := $(if $(SHARED_WHEELS),--find-links $(SHARED_WHEELS))

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip "setuptools<81" wheel
	$(PIP) -e ".[dev]"
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) --no-build-isolation $(MMCV_FIND_LINKS) "mmcv==2.1.0"
	$(PIP) -e ".[dev,mm]"
	touch $@

demo: $(STAMP)
	$(PY) jobs/pipeline.py

demo-library: $(STAMP)
	$(PY) -m rmoe.demo

# The dashboard's browser test drives Debian's Chromium (a test tool's own browser download fails here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test: $(CHROMIUM) is missing; install it with 'sudo apt-get install -y chromium'" >&2; exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

RESULTS ?= runs/results

dashboard: $(STAMP)
	$(PY) -m streamlit run dashboard/app.py -- --results $(RESULTS)

screenshot: $(STAMP) $(CHROMIUM)
	$(PY) dashboard/screenshot.py --results $(RESULTS) --out docs/overview.png

# The suite on two pytest-xdist workers, each with its own local Ray and S3 endpoint; files go whole to a
# worker, slow files first (tests/conftest.py). One at a time, the tests kept the two cores busy 75% of the
# time (Ray start-ups, one-worker stages, waits on processes): 1963 s of pytest; on two workers 84%, 1568 s.
TEST_WORKERS ?= 2

test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/expert_parallel.py
	$(PY) benchmarks/data_ingest.py
	$(PY) benchmarks/stage_overhead.py --config configs/smoke.yaml

clean:
	rm -rf $(VENV) .pytest_cache
