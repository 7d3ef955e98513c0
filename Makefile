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

.PHONY: repro test exp venv clean-venv browser

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

repro: $(STAMP)
	dvc repro

# The experiments at a glance: the params each one changed and each model's headline score (R@1,
# VQA accuracy, CIDEr, chat exact match). Plain `dvc exp show` has every param, dep and score.
EXP_KEEP := ^(Experiment|Created|siglip\.i2t_r1|vqa\.accuracy|captioner\.cider|chat\.exact_match)$$
EXP_DROP := .*/.*|requirements\.txt|(siglip\.(i2t_r5|t2i_|r1_|r5_|zero_shot)|vqa\.(blind_|by_type|n_)|captioner\.(baseline_|bleu|meteor|rougeL|n_)|chat\.(blind_|by_type|followup_|n_|nll_)).*
exp: $(STAMP)
	dvc exp show --only-changed --keep '$(EXP_KEEP)' --drop '$(EXP_DROP)' $(ARGS)

test: $(STAMP) browser
	python -m pytest -q -n 2 --dist loadgroup --durations=12 tests

# The demo's browser test drives Debian's chromium through its matching chromedriver. Installed
# with apt when missing (as root, or through sudo); where that cannot be done the test is skipped
# with the reason, unless VLMPIPE_REQUIRE_BROWSER=1 (as in CI) makes it fail.
BROWSER_PKGS := chromium chromium-driver
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo -n"; \
	  else echo "make: no root or sudo to install $(BROWSER_PKGS); the browser test will be skipped"; exit 0; fi; \
	  echo "installing $(BROWSER_PKGS) with apt (for the demo's browser test)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -q $(BROWSER_PKGS) >/dev/null 2>&1 || \
	    { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q $(BROWSER_PKGS) >/dev/null; } || \
	    echo "make: could not install $(BROWSER_PKGS); the browser test will be skipped"; \
	fi

clean-venv:
	rm -rf $(VENV)

# A preset over params.yaml, never over your edits: `make preset NAME=full` copies presets/full.yaml
# to params.yaml, and refuses in one line, leaving params.yaml as it was, while it holds changes not
# committed to git (staged or not). A params.yaml byte for byte one of the presets holds none.
PRESETS := $(sort $(basename $(notdir $(wildcard presets/*.yaml))))
preset_known = $(and $(filter 1,$(words $(NAME))),$(if $(findstring %,$(NAME)),,$(filter $(NAME),$(PRESETS))))
params_replaceable = $(shell if [ ! -e params.yaml ]; then echo yes; exit 0; fi; \
  for p in presets/*.yaml; do cmp -s params.yaml "$$p" && { echo yes; exit 0; }; done; \
  git ls-files --error-unmatch params.yaml >/dev/null 2>&1 && git diff --quiet HEAD -- params.yaml 2>/dev/null && echo yes)
.PHONY: preset
preset:
	$(if $(preset_known),,$(error make preset: $(if $(NAME),no preset '$(NAME)',say which with NAME=<name>); the presets are: $(PRESETS)))
	$(if $(params_replaceable),,$(error params.yaml has changes not committed to git: keep them (git stash, or git commit params.yaml) or discard them (git checkout HEAD -- params.yaml), then run make preset NAME=$(NAME) again))
	cp presets/$(NAME).yaml params.yaml
	@echo "params.yaml is presets/$(NAME).yaml now: dvc repro runs it (git checkout HEAD -- params.yaml goes back)"
