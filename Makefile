# Two commands do all the set-up on a fresh machine:
#   make demo   export the bundled example (random-weight DeiT-Tiny) with --dynamic and validate it
#   make test   run the test suite
# Both create .venv and install the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: demo test lint wheel clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(BIN)/ats-deploy export random:0 --arch deit_tiny_patch16_224 --dynamic
	cd $(DEMO_DIR) && ../$(BIN)/ats-deploy check deit_tiny_patch16_224_ats.onnx --target tensorrt-10 --target onnxruntime

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

wheel: $(STAMP)
	$(BIN)/python -m build --wheel --no-isolation --outdir dist

clean:
	rm -rf $(DEMO_DIR) dist build results
