# Two commands on a fresh machine:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)

.PHONY: install demo test test-all bench fashion-mnist clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3 setuptools==84.2.1 wheel==0.48.0
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.lock pytest==9.2.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Fashion-MNIST comes from Debian's package dataset-fashion-mnist when no data directory holds it.
fashion-mnist:
	@if [ -z "$$SLIMCART_DATA_DIR" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	  else echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' or set SLIMCART_DATA_DIR"; fi; \
	fi

demo: install fashion-mnist
	$(VENV)/bin/slimcart demo --out runs/demo --overwrite

# unit tests on tiny models (minutes)
test: install
	$(PY) -m pytest -q -m "not slow"

# everything, including the tests that train real models on real data (CI runs this)
test-all: install fashion-mnist
	$(PY) -m pytest -q

bench: install fashion-mnist
	$(PY) benchmarks/run.py
	$(PY) benchmarks/pruning.py
	$(PY) benchmarks/embedding_rows.py
	$(PY) benchmarks/graph_opt.py
	$(PY) benchmarks/runtimes.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/static_int8.py
	$(PY) benchmarks/quant_intent.py
	$(PY) benchmarks/weight_only.py
	$(PY) benchmarks/embedding_quant.py
	$(PY) benchmarks/deep_compression.py
	$(PY) benchmarks/distill_intent.py
	$(PY) benchmarks/vocab_fallback.py
	$(PY) benchmarks/distill_ctr.py
	$(PY) benchmarks/train_layout.py
	$(PY) benchmarks/assemble.py

clean:
	rm -rf $(VENV) runs
