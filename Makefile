# Two commands on a fresh clone:  `make study`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.scae-installed
# CPU build of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: study test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

study: $(STAMP)
	$(BIN)/scae study --out results

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf results .pytest_cache build src/*.egg-info
