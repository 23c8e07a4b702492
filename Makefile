# Every target bootstraps its own virtual environment in $(VENV) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.upa-installed

# Study settings. PROFILE=demo uses the embedded digits and a randomly initialised encoder;
# override DATA, ARCH and WEIGHTS to run on real datasets with pretrained weights.
DATA ?= data
DATASET ?= Digits
ARCH ?= ViT-B-32
WEIGHTS ?= random
DEVICE ?= auto

.PHONY: setup study test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[study,dev]"
	touch $(STAMP)

setup: $(STAMP)

study: $(STAMP)
	@if [ "$(DATASET)" = "Digits" ]; then $(VENV)/bin/upa demo-data --data-root "$(DATA)"; fi
	$(VENV)/bin/upa run --dataset "$(DATASET)" --data-root "$(DATA)" --arch "$(ARCH)" \
		--weights "$(WEIGHTS)" --device "$(DEVICE)" --experiment study --skip-existing

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
