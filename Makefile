SHELL := /bin/bash
# `make test`: set up .venv (pinned torch, triton, test tools, this package) and run pytest.
# `make demo`: the main job (see README). Everything installs itself: CI starts from a clone.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
# CUDA 13.0 builds; on the CI machines they come from a local wheelhouse.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS      := triton numpy pillow tqdm matplotlib mlxtend scipy tensorboard h5py pytest pytest-benchmark
export MAX_JOBS ?= 2
STAMP     := $(VENV)/.occam-installed

.PHONY: install test bench demo clean-build FORCE

$(PY):
	python3 -m venv $(VENV)

# The package list as text, rewritten only when it changes: an edit elsewhere in this file
# neither reinstalls the packages nor rebuilds the extension.
$(VENV)/.deps-list: FORCE | $(PY)
	@echo "$(TORCH_PINS) $(DEPS)" | cmp -s - $@ || echo "$(TORCH_PINS) $(DEPS)" > $@

# Reinstalled when the list above changes; pip skips what is already there.
$(VENV)/.deps-installed: $(VENV)/.deps-list
	$(PIP) install -q $(TORCH_PINS) $(DEPS)
	touch $@

# Rebuild the extension only when its sources or the build script change (nvcc takes minutes).
$(STAMP): $(VENV)/.deps-installed setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install --no-build-isolation --no-deps -v -e . 2>&1 | tee $(VENV)/build.log \
	  | grep -E "occam_kernels:|nvcc .*\.cu|error" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import json, occam_kernels; print(json.dumps(occam_kernels.build_info(), indent=1))"
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest --benchmark-disable

# The main job: Biased MNIST, the ResNet baseline and OccamResNet-18 side by side (a quick
# preset on CPU, a larger one on GPU); pictures land in runs/demo and docs/.
demo: install
	$(PY) -m occamnets.cli demo --out runs/demo --docs docs

clean-build:
	rm -rf build $(STAMP) occam_kernels/_C*.so

# Time every suite (GPU: section-8 shapes; CPU: the scaled-down smoke shapes) and render
# bench/RESULTS.md. The JSON is kept per device under bench/results/; on a GPU the device
# times too (bench/device_time.py), in bench/results/DEVICE_device_time/.
# The device's name, asked once per run (a cpu_ prefix without a GPU).
DEVICE_NAME = $(PY) -c "import torch,platform,re;print(re.sub('[^A-Za-z0-9]+','_',torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu_'+platform.machine()))"
bench: install
	mkdir -p bench/results
	name=$$($(DEVICE_NAME)) && \
	$(PY) -m pytest bench -q -p no:cacheprovider --benchmark-max-time=0.2 \
	  --benchmark-json=bench/results/$$name.json && \
	case $$name in cpu_*) ;; *) $(PY) bench/device_time.py --out bench/results/$${name}_device_time;; esac
	$(PY) bench/report.py bench/results/*.json $$(ls bench/results/*/device_time.json 2>/dev/null) \
	  --out bench --trim
