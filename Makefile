# Two commands for a fresh machine:
#   make book   builds the Jupyter Book (executes every notebook), prints where it is
#   make test   runs the test suite
# Both create .venv and install the pinned versions first (make setup, idempotent).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser book book-quick test test-fast memcheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: setup
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The same build with DDETR_QUICK=1: training cells run a few iterations only.
book-quick: setup
	DDETR_QUICK=1 $(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

test: setup browser
	$(BIN)/python -m pytest --durations=10

# Debian's chromium and chromedriver for tests/test_book_browser.py (needs root; the
# test is skipped, saying so, when they are missing).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } || \
	  echo "could not install chromium: the browser test will be skipped"

# Everything but the slow end-to-end tests (book build, training runs, torchrun).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# The CUDA kernels under compute-sanitizer's memcheck (needs a GPU and compute-sanitizer).
memcheck: setup
	$(BIN)/python -m pytest tests/test_kernel_cuda.py -k memcheck -m cuda -rs

clean:
	rm -rf _build .pytest_cache
