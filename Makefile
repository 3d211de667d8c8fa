# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench gpu-check plan-estimates clean

$(STAMP): requirements.txt requirements_runtime.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

demo: $(STAMP)
	$(BIN)/python -m pretrain.demo

gpu-check: $(STAMP)
	$(BIN)/python -m pretrain.gpu_check $(ARGS)

# The memory estimates shipped in the repo (pretrain/plan/shipped_estimates.json): rerun after changing model/, the
# optimizers or the step tracing (tests/test_shipped_estimates.py says when). Prints how long it took. The suite's own
# estimates (tests/data/suite_estimates.json) go stale then too: PRETRAIN_TEST_SAVE_ESTIMATES=1 make test.
plan-estimates: $(STAMP)
	$(BIN)/python -m pretrain.plan.ship_estimates

# Every bench with its defaults, except bench/peers.py, which times checkouts of other trainers that you name.
bench: $(STAMP)
	for f in bench/*.py; do [ $$f = bench/peers.py ] && continue; echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
