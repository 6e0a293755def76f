# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so pip takes the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= demo-tree

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

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

# Benchmarks against their anchors (du, mergekit-extract-lora), results in bench/out/.
# The GPU comparison is its own run: bench/lowrank_vs_mergekit.py --size 2b --device cuda.
bench: venv
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) bench/audit_vs_du.py --sizes 1000 3000 10000 --reps 5
	$(PY) bench/audit_slow_storage.py --checkpoints 1000 --delay-us 100 --reps 3
	$(PY) bench/prune_cost.py --checkpoints 10000 --reps 3
	$(PY) bench/inspect_speed.py
	$(PY) bench/migrate_bytes.py
	$(PY) bench/lowrank_vs_mergekit.py --size 119m --reps 3 --exact

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO)-outside $(DEMO)-migrated build *.egg-info
