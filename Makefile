# Everything a fresh machine needs is installed from here, at the versions the suite was tested
# with (constraints.txt; regenerate it with `make constraints` after a tested upgrade).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench fashion-mnist lint constraints clean mutants docs wheel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

# sparse_cl_jax/__init__.py holds __version__: the installed metadata follows it.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt sparse_cl_jax/__init__.py
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,tfds,docs]'
	touch $(STAMP)

install: $(STAMP)

## make test: create .venv if missing, install, run the whole suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

## make demo: PackNet and fine-tuning on 5-task Split-Digits (embedded data, no download).
demo: $(STAMP)
	$(BIN)/python experiments/demo.py --workdir=/tmp/sparse_cl_jax_demo

## Real Fashion-MNIST from Debian (needs root); used by benchmarks and docs/results.md.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

bench: $(STAMP) fashion-mnist
	$(BIN)/python benchmarks/core_overhead.py
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/python benchmarks/peer_pytorch.py
	$(BIN)/python benchmarks/run_breakdown.py

## make mutants: single-site bugs planted one at a time in a copy of the checkout; prints the
## kill rate of the test files mapped to each (tests/mutants.py; slow, not part of make test).
mutants: $(STAMP)
	$(BIN)/python tests/mutants.py

lint: $(STAMP)
	$(BIN)/ruff check sparse_cl_jax tests experiments configs benchmarks docs

## make docs: the documentation site in site/ (mkdocs.yml; strict: a warning fails the build).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

## make wheel-check: build the wheel, install it into a fresh venv (dependencies from PyPI at the
## pinned versions) and run a packaged preset from outside the checkout.
WHEEL_DIR ?= /tmp/sparse_cl_jax_wheel
WHEEL_VENV ?= /tmp/sparse_cl_jax_wv
WHEEL_RUN ?= /tmp/sparse_cl_jax_wheel_run
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR) $(WHEEL_VENV) $(WHEEL_RUN)
	$(BIN)/pip wheel . --no-deps --quiet -w $(WHEEL_DIR)
	$(PY) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet -c constraints.txt $(WHEEL_DIR)/sparse_cl_jax-*.whl
	cd /tmp && $(WHEEL_VENV)/bin/python -m sparse_cl_jax --config=packnet:runlocal \
	  --workdir=$(WHEEL_RUN)
	test -f $(WHEEL_RUN)/results.json && echo "wheel-check: $(WHEEL_RUN)/results.json written"

## make constraints: pin what .venv holds now (after `make test` passed on it).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  grep -v -i '^torch==' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache site build dist
