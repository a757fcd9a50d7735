# balloonctl: the two commands a newcomer needs are `make demo` and `make test`.
# Both work on a fresh Debian 12 machine: what is missing is installed (apt-get as root).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the tests need, each with the command or module that proves it present.
APT_NEEDS := python3-venv

.PHONY: demo test lint typecheck unit bench system-deps clean

# System packages: only when something is missing, so a ready machine never calls apt-get.
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(BIN)/python: | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Only the source folders that exist (git keeps no empty ones).
LINT_DIRS := $(wildcard balloonctl tests fuzz fixtures)

lint: $(VENV)/.installed
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# The tour on two simulated VMs behind real QMP sockets: no hypervisor needed.
demo: $(VENV)/.installed
	$(BIN)/balloonctl demo

bench: $(VENV)/.installed
	$(BIN)/balloonctl bench decode

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
