# Set-up and entry points. `make demo` and `make test` are the README's two commands:
# each creates .venv when absent, installs torch and the other dependencies, builds the
# extension against that torch (--no-build-isolation), then runs.
#
# TORCH_SPEC picks torch: the CPU build that lies on this machine's disk by default;
# e.g. `make test TORCH_SPEC=torch==2.14.1` on a CUDA machine.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install demo test test-emulated test-sanitized bench cuda-build-check install-check gpu-check clean

# The location drop-ins' peers, ESPnet and SpeechBrain, are installed without their
# dependencies: the compat tests load only files that need torch and numpy.
$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install numpy pytest pytest-xdist expecttest hypothesis ninja pybind11 "setuptools>=64" wheel \
		babel tqdm matplotlib
	$(PIP) install --no-deps espnet==202511 speechbrain==1.1.2
	touch $@

install: $(VENV)/.deps-installed
	$(PIP) install --no-build-isolation -e .

# The main job: the demo trains a date normaliser with fused attention and reports on it
# (python -m attention_ext.demo --help; its extra dependencies are in .deps-installed).
demo: install
	$(PY) -m attention_ext.demo

# The test suite, then the CUDA kernels under the CPU emulation (test-emulated); every
# suite runs on one pytest-xdist worker per core.
test: install
	$(PY) -m pytest -q -n auto tests
	$(MAKE) test-emulated

# The suite again with the CUDA host code and kernels as the ops' CPU kernels, run under
# the CPU emulation of CUDA's execution model; built in a temporary copy of the tree (the
# normal build here is left alone), with this .venv.
test-emulated: $(VENV)/.deps-installed
	PY=$(PY) bash .ci/test_emulated.sh

# The suite under AddressSanitizer + UndefinedBehaviorSanitizer, against the CPU kernels
# and against the emulated CUDA kernels (each in a temporary copy, with this .venv); any
# report fails.
test-sanitized: $(VENV)/.deps-installed
	PY=$(PY) bash .ci/test_sanitized.sh cpu
	PY=$(PY) bash .ci/test_sanitized.sh emulated-cuda

# Every benchmark of this machine's device (the end-to-end models, the ops, the layers,
# the drop-ins, beam search): benchmarks/results/report-<machine>-<date>.md, .json and
# .png (the end-to-end speedups). `make bench QUICK=1`: each benchmark's --quick.
bench: install
	$(PY) benchmarks/report.py $(if $(QUICK),--quick)

# Compiles and links the CUDA kernels against a CUDA build of torch (no GPU needed).
cuda-build-check:
	bash .ci/cuda_build_check.sh

# A user's install: a wheel built from the tree into a fresh virtual environment, then an
# import, one op call and `python -m attention_ext.demo --help` from outside the tree.
install-check: install
	PY=$(PY) bash .ci/install_check.sh

# On a machine with a CUDA GPU and a CUDA build of torch (PY, default python3): build for
# that GPU in place, run the CUDA tests and the CUDA benchmark; logs in gpu-check-logs/.
gpu-check:
	bash .ci/gpu_check.sh

clean:
	rm -rf build attention_ext/_C*.so *.egg-info
