# geoclip: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real EuroSAT_MS tiles the synthetic spectra are compared with (`make docs`).
REAL_TILES ?= ../shared/data/eurosat_ms_dev
# Keep everything local and quiet: no telemetry, no hub downloads.
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-fast services schedule docs lock clean

venv: $(VENV)/.installed

# One resolve from the fully pinned lock file, then the project itself without touching the pins.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	time dvc repro
	dvc push
	@echo "metrics:"; dvc metrics show

# Two workers (pytest-xdist), one test file each at a time: module fixtures and servers stay with their tests.
PYTEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test-fast: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

# moto S3 :9000, MLflow :5000 (SQLite + S3 artifacts), Prefect :4200, all on 127.0.0.1; Ctrl-C stops them.
services: venv
	$(BIN)/geoclip services --dir .services

# Scoring on score.cron here: a Prefect server (:4200), prefect.yaml deployed, a process worker; Ctrl-C stops them.
schedule: venv
	$(BIN)/geoclip schedule

docs: venv
	geoclip diagram --out docs/architecture.png
	geoclip calibrate --real $(REAL_TILES) --out docs/calibration.md

# Re-resolve the lock from requirements.in (maintainers only).
lock:
	rm -rf /tmp/geoclip-lock && $(PYTHON) -m venv /tmp/geoclip-lock
	/tmp/geoclip-lock/bin/pip install --quiet -r requirements.in
	/tmp/geoclip-lock/bin/pip freeze --exclude-editable | grep -v '^geoclip' > requirements.lock

clean:
	rm -rf data models eval/confusion.png outputs reports mlflow.db mlartifacts
