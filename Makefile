# The two commands of README.md. Each creates .venv from the requirements files when it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic_cells
CONFIG ?= experiments/configs/synthetic_cells.py
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest worker processes: compilation is mostly single-threaded, so two workers use both cores of a small CI machine
TEST_WORKERS ?= 2

.PHONY: train test lint clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

# Main job: train the default experiment, evaluate and checkpoint it, then predict the exported test images with
# the trained checkpoint. Running it again resumes from the latest checkpoint.
train: $(VENV)/.installed
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m experiments.predict --workdir=$(WORKDIR) --input=$(WORKDIR)/test_images --output=$(WORKDIR)/predictions

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check segjax experiments tests
	$(VENV)/bin/ruff format --check segjax experiments tests

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) runs
