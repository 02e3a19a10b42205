# Two commands do everything on a fresh machine: `make demo` and `make test` (`make browser` adds Chromium).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic_fasteners
DEMO_MODEL := saved_models/patchcore_synthetic_fasteners.pkl

.PHONY: setup test demo browser clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-runtime.txt requirements-fit.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Optional, needs root: headless Chromium renders the HTML report in one test (skipped without it).
# Kept out of `make test` so that testing never installs system packages.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will be skipped"

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) scripts/download_datasets.py --synthetic --out $(DEMO_DATA)  # seconds; replaces only its own files
	$(PY) train.py --data-dir $(DEMO_DATA) --backbone efficientnet_lite0 --output $(DEMO_MODEL)
	$(PY) inference.py --model $(DEMO_MODEL) --dir $(DEMO_DATA)/test --visualize --json --quiet \
		> outputs/demo_predictions.json
	@echo "predictions: outputs/demo_predictions.json"
	@echo "report:      outputs/patchcore_synthetic_fasteners/report.html"

# Removes what runs produced (models, reports) and what `pip install .` builds; data/ is left alone.
clean:
	find outputs saved_models -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf build *.egg-info
