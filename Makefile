# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what they need first; re-running them re-installs nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The core runs on today's stack (numpy 2, faiss-cpu 1.15). The optional autofaiss backend needs numpy<2
# and faiss<1.14 (its extra pins them), so its tests run in a second environment, .venv-autofaiss.
AUTOFAISS_VENV ?= .venv-autofaiss
ABIN := $(AUTOFAISS_VENV)/bin
# CPU build by default (it lies on disk on the project's machines). GPU machines: `make install GPU=1`
# (optionally TORCH_INDEX=https://download.pytorch.org/whl/cu128 for a given CUDA): a CUDA torch and
# faiss-gpu-cu12 in place of faiss-cpu. See docs/install.md.
GPU ?= 0
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
FAISS_GPU_SPEC ?= faiss-gpu-cu12==1.14.1.post1
STAMP := $(VENV)/.installed-$(if $(filter 1,$(GPU)),gpu,cpu)
AUTOFAISS_STAMP := $(AUTOFAISS_VENV)/.installed

.PHONY: install install-autofaiss data demo tiny test test-core test-autofaiss lint format bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip uninstall --quiet -y faiss-gpu-cu12 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --quiet -e ".[dev]"
	if [ "$(GPU)" = "1" ]; then \
		$(BIN)/python -m pip uninstall --quiet -y faiss-cpu && \
		$(BIN)/python -m pip install --quiet --quiet "$(FAISS_GPU_SPEC)"; fi
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The autofaiss extra's own environment (numpy<2, faiss-cpu<1.14), for its backend's tests.
$(AUTOFAISS_STAMP): pyproject.toml
	test -x $(ABIN)/python || $(PYTHON) -m venv $(AUTOFAISS_VENV)
	$(ABIN)/python -m pip install --quiet --quiet --upgrade pip
	$(ABIN)/python -m pip install --quiet --quiet "$(TORCH_SPEC)"
	$(ABIN)/python -m pip install --quiet --quiet -e ".[autofaiss,dev]" "embedding-reader>=1.7"
	touch $(AUTOFAISS_STAMP)

install-autofaiss: $(AUTOFAISS_STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

# Fashion-MNIST from Debian (real images for the demo and its CI test); without it they say so and stop/skip.
data:
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "could not install dataset-fashion-mnist (needs root and Debian's package registry)"

demo: $(STAMP) data
	$(BIN)/reco demo

tiny: $(STAMP)
	$(BIN)/reco prepare-tiny --out artifacts/tiny
	$(BIN)/reco fit --config configs/tiny.yaml

test: test-core test-autofaiss

test-core: $(STAMP) data
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

# only the tests marked autofaiss; there a skip (extra missing) is a failure
test-autofaiss: $(AUTOFAISS_STAMP)
	RECO_REQUIRE_AUTOFAISS=1 $(ABIN)/python -m pytest -q -m autofaiss

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/memory_backends.py --large --out bench_out
	$(BIN)/python benchmarks/ivfpq_curves.py --out bench_out/ivfpq_curves
	$(BIN)/python benchmarks/train_throughput.py --out bench_out
	$(BIN)/python benchmarks/streaming_ram.py --out bench_out
	$(BIN)/python benchmarks/memory_ondisk.py --out bench_out/ondisk
	$(BIN)/python benchmarks/demo_accuracy.py --seeds 3 --out bench_out
	$(BIN)/python benchmarks/fusion_ablations.py --root artifacts/demo --out bench_out
	$(BIN)/python benchmarks/loss_memory.py --out bench_out

# The GPU check (docs/install.md): one table + JSON. On a GPU machine with its own torch, bring the
# other wheels first: `bash benchmarks/gpu_wheels.sh download` (here) and `... install` (there).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out bench_out/gpu_check

clean:
	rm -rf artifacts runs bench_out .pytest_cache
