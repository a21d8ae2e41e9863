# dapeng — the two commands a fresh machine needs: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install run test test-fast lint bench clean

# Idempotent: re-installs only when pyproject.toml changed since the last install.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The default example: a text CNN with GloVe vectors on Rotten Tomatoes (a few minutes on 2 CPU
# cores). Others: make run RUN_CONFIG=examples/fashion-mnist-cnn.yaml RUN_DIR=runs/fm (about an
# hour). Quicker: make run RUN_ARGS="--set train.epochs=1". A run that was stopped continues
# from its last checkpoint (--resume is added when one exists).
RUN_ARGS ?=
RUN_CONFIG ?= examples/rotten-tomatoes-cnn.yaml
RUN_DIR  ?= runs/rotten-tomatoes-cnn
run: install
	$(BIN)/dapeng train $(RUN_CONFIG) --out $(RUN_DIR) \
		$(if $(wildcard $(RUN_DIR)/checkpoints/last.pt),--resume) $(RUN_ARGS)

test: install
	$(BIN)/pytest -q -n 2 --dist loadgroup tests

test-fast: install
	$(BIN)/pytest -q -x tests/unit

lint: install
	$(BIN)/ruff check src tests benchmarks examples

bench: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"  # the peers some benchmarks measure against
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
