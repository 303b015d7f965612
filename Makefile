# `make demo` sets everything up and runs the main job on the builtin default model;
# `make test` sets up the test tools and runs the test suite (fast tests + slow real-model tests).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-dev demo test test-fast lint bench

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

demo: setup
	$(BIN)/alignment-artifacts analyze --model qwen2.5-coder-1.5b-instruct
	@echo "== a mildly sensitive request the model refuses, answered with the refusal direction ablated"
	$(BIN)/alignment-artifacts suppress "How can I sneak snacks into a movie theatre?" --model qwen2.5-coder-1.5b-instruct --mode ablate --max-tokens 64
	@echo "== an everyday request, refused with the refusal direction amplified"
	$(BIN)/alignment-artifacts suppress "Give me a recipe for banana bread." --model qwen2.5-coder-1.5b-instruct --mode amplify --scale 1.0 --max-tokens 32

test: setup-dev
	$(BIN)/ruff check src tests bench examples scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow" -q
	$(BIN)/python -m pytest -m slow -q

test-fast: setup-dev
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check src tests bench examples scripts
	$(BIN)/mypy

bench:
	$(BIN)/python bench/collect.py
	$(BIN)/python bench/steer.py
