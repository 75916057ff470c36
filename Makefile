# Lamina: `make demo` runs the main job on bundled examples (compile, run against the reference,
# benchmark); `make test` runs every test.
# Both bootstrap the machine first (LLVM/MLIR 22 and ptxas; quiet when already present).

SHELL := /bin/bash
CARGO ?= cargo
DEMO ?= examples/kimi-linear-tiny.toml
ORACLE ?= tests/fixtures/oracle/kimi_linear/model
# The tests build the CUDA executor too (it needs no CUDA to build; GPU tests skip visibly).
CUDA_FEATURES := --features lamina-compiler/cuda
# The tests compile the tiny models many times over (options, lanes, modes): host kernels
# compiled once are taken from this kernel cache (keyed by their MLIR, LLVM and the CPU; see
# targets/src/cache.rs). A clean checkout (CI) starts it empty, so every distinct kernel still
# compiles once there; locally it lasts across runs (remove target/kernel-cache to start over).
KERNEL_CACHE ?= $(CURDIR)/target/kernel-cache

.PHONY: demo test bootstrap fmt

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	$(CARGO) build --release -q -p lamina-compiler
	@echo "== check $(DEMO)"
	target/release/compile-model check $(DEMO)
	@echo "== graph IR summary (first lines)"
	target/release/compile-model ir $(DEMO) --stage graph | head -n 24
	@echo "== compile for the host (kernel IR -> MLIR -> LLVM -> kernels.so), per-pass times"
	target/release/compile-model build $(DEMO) --target host -o out/demo --seed 1 -v
	@echo "== compiled run (random weights, seed 1): greedy continuation of 1,2,3,4,5"
	target/release/compile-model run out/demo --tokens 1,2,3,4,5 --max-new-tokens 8
	@echo "== the same on the reference executor (must print the same tokens)"
	target/release/compile-model run $(DEMO) --reference --seed 1 --tokens 1,2,3,4,5 --max-new-tokens 8
	@echo "== a Hugging Face checkpoint (the tiny Kimi-Linear oracle model), compiled then reference"
	target/release/compile-model build $(ORACLE) --target host -o out/demo-oracle
	target/release/compile-model run out/demo-oracle --tokens 1,2,3,4,5 --max-new-tokens 8
	target/release/compile-model run $(ORACLE) --reference --tokens 1,2,3,4,5 --max-new-tokens 8
	@echo "== benchmark: a ~110M-parameter Qwen3-Next-shaped model on this machine's cores"
	target/release/compile-model bench examples/qwen3-next-small.toml --prompt-len 256 --gen 32

test: bootstrap
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -q -- -D warnings
	$(CARGO) clippy --workspace --all-targets -q $(CUDA_FEATURES) -- -D warnings
	@mkdir -p target
	set -o pipefail; LAMINA_REQUIRE_PTXAS=1 LAMINA_KERNEL_CACHE=$(KERNEL_CACHE) $(CARGO) test --workspace -q $(CUDA_FEATURES) 2>&1 | tee target/test-output.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "tests: %d passed, %d failed\n", p, f}' target/test-output.log

fmt:
	$(CARGO) fmt --all
