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

# The demo's story (fixtures/demo.py): builds $(DEMO), $(DEMO)-outside, $(DEMO)-ordinary and
# $(DEMO)-migrated (replacing an earlier demo's), runs ckpt-tools on them, checks that what it was
# told to expect is what it found (exit 1 if not), and ends with the next steps.
demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m fixtures.demo --replace $(DEMO)

# Benchmarks against their anchors (du, aws s3 ls, mergekit-extract-lora), results in bench/out/.
# The GPU comparison is its own run: bench/lowrank_vs_mergekit.py --size 2b --device cuda.
bench: venv
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) bench/audit_vs_du.py --sizes 1000 3000 10000 --reps 5
	$(PY) bench/audit_slow_storage.py --checkpoints 1000 --delay-us 100 --reps 3
	$(PY) bench/audit_bucket.py --checkpoints 300 --latency-ms 20 --jobs 1 4 16 64
	$(PY) bench/prune_cost.py --checkpoints 10000 --reps 3
	$(PY) bench/retention_cost.py --checkpoints 10000 --reps 5 --mix dylora ordinary --delete-checkpoints 1000 --delete-reps 5
	$(PY) bench/inspect_speed.py
	$(PY) bench/migrate_bytes.py
	$(PY) bench/lowrank_vs_mergekit.py --size 119m --reps 3 --exact

clean:
	rm -rf $(VENV) $(LATEST) $(DEMO) $(DEMO)-outside $(DEMO)-migrated $(DEMO)-ordinary build *.egg-info
