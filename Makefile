# The two commands of the README, for a fresh Linux machine with Python >= 3.11:
#   make run    set up .venv and run the main job on its embedded default (configs/smoke.py)
#   make test   set up .venv and run the whole test suite (what CI runs)
# and, for the edit loop, make test-fast: the unit and parity tests, without whole-job, kill-and-resume,
# multi-process and real-size tests (tests/conftest.py marks them slow).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?= configs/smoke.py
PYTEST_ARGS ?=
# Test processes (pytest-xdist). 2 suits the 2-core CI machine: much of the suite is single-threaded
# XLA compilation and subprocess start-up, which a second worker overlaps; use more on bigger machines.
TEST_WORKERS ?= 2

.PHONY: setup run test test-fast clean-venv

setup: $(STAMP)

# torch is pinned in the same pip command as everything else (requirements.lock says
# torch==2.13.0), so a CPU machine takes the CPU build and nothing upgrades it.
# open-clip-torch and gem-torch are the PyTorch references of the CLIP/GEM parity tests (and
# open_clip carries CLIP's BPE vocabulary); they are installed without their dependencies
# because those pull torchvision, which has no CPU build for torch 2.13.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.lock
	$(PY) -m pip install --quiet --no-cache-dir --no-deps open-clip-torch==3.3.0 gem-torch==1.0.1 -e .
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(PY) -m zsp_jax.main --config $(CONFIG)

# --durations: the 15 slowest tests are listed at the end of each run. --no-loadscope-reorder keeps the
# collection order (tests/conftest.py puts the longest files first) instead of sending the files with the most
# tests first, which left the single-test files of several minutes to the end of one worker.
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
