# Two entry points for a fresh machine (see README): `make bench` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench test survey clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,torch]'
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(PY) -m experiments.bench --config=configs/bench/quick.py --workdir=runs/quick

survey: $(STAMP)
	$(PY) -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
