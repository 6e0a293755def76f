# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so pip takes the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Every other package at the exact version the suite last passed with (tools/lock.py, `make lock`).
LOCK   ?= requirements.lock
DEMO   ?= demo-tree
# `make test-latest` and `make lock`: the same suite on the newest releases, in a venv of its own.
LATEST ?= .venv-latest

.PHONY: venv test test-latest lock demo bench clean

# The project is installed without build isolation so that its build backend (setuptools) is the
# locked one too, not whatever release is newest today.
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip setuptools
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(LOCK) --no-build-isolation -e ".[test]"
	$(PY) tools/lock.py check $(LOCK)
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The suite against the newest releases of everything but torch: a drift shows here, not on main.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(LATEST)/torch-choice.txt   # an eager upgrade must not swap torch's build
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation \
		-c $(LATEST)/torch-choice.txt -e ".[test]"
	-$(LATEST)/bin/python tools/lock.py check $(LOCK)
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# Runs the suite on the newest releases and, only when it passes, makes them the lock.
lock: test-latest
	$(LATEST)/bin/python tools/lock.py write $(LOCK)

demo: venv
	rm -rf $(DEMO) $(DEMO)-outside
	HF_HUB_OFFLINE=1 $(PY) -m fixtures $(DEMO)
	@echo; echo '$$ ckpt-tools audit $(DEMO)'
	-$(VENV)/bin/ckpt-tools audit --no-progress $(DEMO)
	@echo; echo '$$ ckpt-tools prune --dry-run $(DEMO)'
	-$(VENV)/bin/ckpt-tools prune --dry-run --no-progress $(DEMO)
	rm -rf $(DEMO)-migrated
	@echo; echo '$$ ckpt-tools migrate --base-model $(DEMO)-outside/base-models/llama --rank 4 $(DEMO) $(DEMO)-migrated'
	-HF_HUB_OFFLINE=1 $(VENV)/bin/ckpt-tools migrate --no-progress --base-model $(DEMO)-outside/base-models/llama --rank 4 $(DEMO) $(DEMO)-migrated
	@echo; echo '$$ ckpt-tools audit -q $(DEMO)-migrated'
	-$(VENV)/bin/ckpt-tools audit -q --no-progress --min-age 0 $(DEMO)-migrated
	@# Ordinary Trainer runs (PEFT adapters, full and sharded fine-tunes, DeepSpeed/FSDP, damaged
	@# copies) live beside the DyLoRA tree, not in it: the counts announced above stay the tree's own.
	rm -rf $(DEMO)-ordinary
	HF_HUB_OFFLINE=1 $(PY) -m fixtures.ordinary_runs $(DEMO)-ordinary > /dev/null
	@echo; echo '$$ ckpt-tools audit --min-age 0 $(DEMO)-ordinary   # just built: judge it now'
	-$(VENV)/bin/ckpt-tools audit --no-progress --min-age 0 $(DEMO)-ordinary

# Benchmarks against their anchors (du, mergekit-extract-lora), results in bench/out/.
# The GPU comparison is its own run: bench/lowrank_vs_mergekit.py --size 2b --device cuda.
bench: venv
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) bench/audit_vs_du.py --sizes 1000 3000 10000 --reps 5
	$(PY) bench/audit_slow_storage.py --checkpoints 1000 --delay-us 100 --reps 3
	$(PY) bench/prune_cost.py --checkpoints 10000 --reps 3
	$(PY) bench/retention_cost.py --checkpoints 10000 --reps 5 --mix dylora ordinary --delete-checkpoints 1000 --delete-reps 5
	$(PY) bench/inspect_speed.py
	$(PY) bench/migrate_bytes.py
	$(PY) bench/lowrank_vs_mergekit.py --size 119m --reps 3 --exact

clean:
	rm -rf $(VENV) $(LATEST) $(DEMO) $(DEMO)-outside $(DEMO)-migrated $(DEMO)-ordinary build *.egg-info
