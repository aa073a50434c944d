# make demo : set up .venv, write a synthetic category, train, evaluate, print metrics, heatmap path and review page
# make test : set up .venv, lint, run the test suite
# make mutations : check that the suite catches deliberate errors in the method (slow; not part of make test)
# make notebook : install Jupyter into .venv and open visualization.ipynb
# make constraints : pin the .venv's versions in constraints.txt (after make test passes)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_OUT := results/demo

.PHONY: demo test mutations notebook constraints clean

# constraints.txt: the versions the suite last passed with (make constraints writes it from a passing .venv)
$(VENV)/.runtime: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt -c constraints.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) synthetic.py $(DEMO_DATA) --category synthetic
	$(PY) train.py --data_path $(DEMO_DATA) --category synthetic --output_dir $(DEMO_OUT) --weights auto
	$(PY) evaluate.py --data_path $(DEMO_DATA) --category synthetic --output_dir $(DEMO_OUT)
	@echo "heatmaps: $(DEMO_OUT)/synthetic/anomaly_maps/   metrics: $(DEMO_OUT)/synthetic/metrics.json   in a browser: $(DEMO_OUT)/report.html"

# the second pass: the search-, precision- and CPU-dependent tests again, as on a CPU without AVX-512, VNNI, BF16 and AMX
BASELINE_CPU := PATCHCORE_BASELINE_CPU=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2
	$(BASELINE_CPU) $(PY) -m pytest -q -n 2 -m cpu_dependent

$(VENV)/.notebook: $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check notebook
	touch $@

notebook: $(VENV)/.notebook
	$(VENV)/bin/jupyter notebook visualization.ipynb

mutations: $(VENV)/.test
	$(PY) tests/mutations.py

constraints: $(VENV)/.test
	(echo "# The versions make test last passed with (written by make constraints); make installs these."; \
	 $(PY) -m pip freeze --disable-pip-version-check --exclude-editable) > constraints.txt

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_OUT) .pytest_cache .ruff_cache
