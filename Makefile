# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   synthesize the built-in corpus, build shards, train baselines and co-training, print the table
#   make test   run the test suite
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
# The torch (with the torchvision built for it) and DALI builds this machine's driver runs (ops/setup_torch.py
# --explain says why): the package index's build with no NVIDIA GPU, else the CUDA build matching nvidia-smi's CUDA
# version. Override either, e.g.
#   make setup TORCH_PIP="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126" DALI_PIP=nvidia-dali-cuda120==2.4.0
TORCH_PIP ?=
DALI_PIP  ?=
DEMO_DIR  ?= demo-out
DEMO_ARGS ?=

.PHONY: demo readme-demo test setup system-deps gpu-check clean

demo: $(STAMP)
	$(VENV)/bin/cotrain demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

# the demo, then its tables written into README.md between the demo-table markers (what the README quotes is
# what the demo printed)
readme-demo: $(STAMP)
	$(VENV)/bin/cotrain demo --workdir $(DEMO_DIR) --readme README.md $(DEMO_ARGS)

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

setup: $(STAMP)

# The GPU check (bench/gpu_check.py): versions, NVDEC against DALI's CPU decoder, bf16 ZeRO-2/3 training; gpu-check.json
gpu-check: $(STAMP) system-deps
	$(PY) bench/gpu_check.py --out gpu-check.json

# Debian's ffmpeg (ffmpeg-python drives its binaries) and prometheus (with promtool, for the observability
# tests): installed when missing and we are root, otherwise a message saying what to install.
system-deps:
	@if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's ffmpeg"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "ffmpeg and ffprobe are missing: install them (Debian/Ubuntu: sudo apt-get install ffmpeg) and re-run make"; \
	    exit 1; \
	  fi; \
	fi
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus (the observability tests run it and its promtool)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else \
	    echo "prometheus and promtool are missing: their tests will be skipped (Debian/Ubuntu: sudo apt-get install prometheus)"; \
	  fi; \
	fi

$(STAMP): setup.py ops/setup_torch.py | system-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	python3 ops/setup_torch.py --explain
	torch="$(TORCH_PIP)"; [ -n "$$torch" ] || torch=$$(python3 ops/setup_torch.py --pip torch) || exit 1; \
	  dali="$(DALI_PIP)"; [ -n "$$dali" ] || dali=$$(python3 ops/setup_torch.py --pip dali) || exit 1; \
	  $(PY) -m pip install -q $$torch && $(PY) -m pip install -q $$dali
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
