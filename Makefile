# The README's two commands: `make book` and `make test`. Each sets up what it needs once
# (a virtual environment in .venv, stamped so a second run installs nothing) and then works.
PROFILE ?= cpu
# Chapters executed at once after chapter 1 (which builds the SAE and states the others read).
JOBS ?= 2
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

.PHONY: install book book-smoke mathjax chromium lint test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exact: a looser requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[book,dev]"
	touch $@

# Execute the chapter notebooks under PROFILE and build the HTML into _build/$(PROFILE)/html.
# A chapter whose notebook, srlib modules, libraries and data are unchanged since its last run
# is reused; FORCE=1 executes every chapter.
book: $(STAMP)
	$(PY) -m bookbuild --profile $(PROFILE) --jobs $(JOBS) $(if $(FORCE),--force)

# The smoke book that the browser test opens; warnings are errors here.
book-smoke: $(STAMP)
	$(PY) -m bookbuild --profile smoke --strict --jobs $(JOBS)

# MathJax 3 from npm into book/_static/mathjax (git-ignored); `make book` does this when missing.
mathjax: $(STAMP)
	$(PY) -m bookbuild --mathjax-only

# Debian's headless Chromium for the browser test: installed only when missing and we are root;
# without it the browser tests skip and say why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser tests will skip"; \
	fi

# The habits that keep the tree clean: ruff's lint and format check and mypy over srlib and the
# book build (settings in pyproject.toml). `make test` runs this first, before the smoke book.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: $(STAMP) lint chromium book-smoke
	$(PY) -m pytest

clean:
	rm -rf _build
