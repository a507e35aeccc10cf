# milroi: two commands on a fresh clone.
#   make demo   synthetic slides -> features -> MIL training (MLflow) -> ONNX bundle -> gRPC scoring
#   make test   every test (slow ones included, as CI runs them)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench images clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# two workers on the 2-core hosts: one process used 1.2 cores (it waits on image builds, servers
# and MLflow); a fresh-clone make test took 31.2 min with one, 26.0 with two and 27.5 with three
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.bench_encoders

clean:
	rm -rf $(VENV) demo_out
images: $(STAMP)
	bash scripts/containers/build_images.sh
