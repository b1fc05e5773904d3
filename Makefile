# One command each on a fresh machine: the targets create .venv and install what is missing.
# torch is installed first and pinned: 2.13.0 is served as a CPU build; a floating range would pull CUDA wheels.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,docs,cli]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/color_digits.py --output-dir outputs/color_digits

# pytest-timeout and the DDP watchdog of tests/conftest.py end a hung test; `timeout` bounds the whole run too
test: $(STAMP)
	timeout -k 60 3000 $(PY) -m pytest -q

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/penalty_overhead.py
	$(PY) benchmarks/attribution_metrics_cost.py
	$(PY) benchmarks/metrics_speed.py
	$(PY) benchmarks/fairness_overhead.py
	$(PY) benchmarks/generation_report_cost.py
	$(PY) benchmarks/monitor_cost.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) site outputs lightning_logs
