# The README's two commands: `make book` and `make test`. Each sets up what it needs once
# (a virtual environment in .venv, stamped so a second run installs nothing) and then works.
PROFILE ?= cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.srlib-installed
# Local data sets beside the clone (the shared folder), unless the caller says otherwise.
ifeq ($(origin SRLIB_DATA_DIR), undefined)
ifneq ($(wildcard ../shared/data),)
export SRLIB_DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: install book test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exact: a looser requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[book,dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf _build
