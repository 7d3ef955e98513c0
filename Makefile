# The two commands a fresh machine needs: `make repro` and `make test`.
# Both create .venv and install the pinned requirements on first use; the
# stamp file makes later runs skip the install until a requirements file changes.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed

# Stage commands in dvc.yaml call `python`; put the venv first on PATH.
export PATH := $(BIN):$(PATH)
# Quiet a tokenizers warning about forking after parallel use.
export TOKENIZERS_PARALLELISM := false
# torch's OpenMP threads busy-wait by default; on a shared 2-core machine that
# starves the other thread (measured: ~25 vs ~230 images/s). Let idle threads sleep.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: repro test venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest -q --durations=12 tests

clean-venv:
	rm -rf $(VENV)
