# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-mpp experiment-mpp test bench lint configs-reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m pretrain.demos.digits --config configs/demo_digits.json

# Masked patch prediction without labels, few-shot probes, fine-tuning on 10% of the labels vs from scratch.
demo-mpp: $(VENV)/.installed
	$(BIN)/python -m pretrain.demos.digits_mpp

# Does masked patch prediction transfer? Debian's openclipart-png (installed when missing), 3 seeds, 19-35 min on
# 2 CPU cores (two runs at a time; the machine's speed varies between days); the table and the probe curves go into
# BENCHMARKS.md (see pretrain/experiments/mpp_transfer.py).
experiment-mpp: $(VENV)/.installed
	$(BIN)/python -m pretrain.experiments.mpp_transfer --record

# Two pytest-xdist workers, a test file each at a time (its module fixtures are set up once): the suite is CPU-bound
# on two cores, and one worker left a core idle while a job's launcher or a single process started: 1,291 s on one
# worker here, 852 s on two (once the trainer's tests were split into four files of comparable run time). Tests that
# compare step times within a run (marked `alone`) run afterwards, by themselves: the other worker's jobs would come
# and go in the middle of the run they measure.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not bench and not alone" -n 2 --dist loadfile --durations=25
	$(BIN)/python -m pytest -m "alone" --durations=5

# Throughput benchmarks, apart from the tests: each prints ratios against a baseline measured in the same run.
bench: $(VENV)/.installed-bench
	-$(BIN)/python -m benchmarks.bench_build_shards
	-$(BIN)/python -m benchmarks.bench_build_remote
	-$(BIN)/python -m benchmarks.bench_build_plan
	-$(BIN)/python -m benchmarks.bench_loader
	-$(BIN)/python -m benchmarks.bench_peers
	-$(BIN)/python -m benchmarks.bench_trainer
	-$(BIN)/python -m benchmarks.bench_ddp
	-$(BIN)/python -m benchmarks.bench_epoch_order
	-$(BIN)/python -m benchmarks.bench_compile
	-$(BIN)/python -m benchmarks.bench_timm_step
	-$(BIN)/python -m benchmarks.bench_convert

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerates configs/README.md from the pydantic models (a test checks that it is current).
configs-reference: $(VENV)/.installed
	$(BIN)/python -m pretrain.config --reference > configs/README.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
