# dirnet-tf build and test entry points.
#
#   make build-ops   install what is missing, build dirnet_tf/_resample_ops.so
#                    (CPU always; CUDA kernels too when nvcc and a CUDA-enabled
#                    TensorFlow are present)
#   make test        install what the tests need, then run them (pytest)
#   make test-gpu    standalone CUDA-vs-CPU check of the resampler kernels (no TF)
#   make bench       run the benchmark scripts listed in BENCH_MODULES
#   make clean-ops   remove build products
#
# Variables: PYTHON (default python), NVCC (default nvcc), CUDA_ARCHS (default
# "80 90": SASS for each, plus PTX for the last), WITH_CUDA=0 to skip CUDA.

PYTHON ?= python
NVCC ?= nvcc
CXX ?= g++
CUDA_ARCHS ?= 80 90

BUILD_DIR := ops/build
LIB := dirnet_tf/_resample_ops.so
TF_ID := $(BUILD_DIR)/tf_id.txt
TF_MK := $(BUILD_DIR)/tf_flags.mk

# Benchmark scripts run by `make bench` (python -m <module>, from the repo root).
BENCH_MODULES := benchmarks.resample benchmarks.training benchmarks.registration

CORE_HEADERS := ops/resample_core.h ops/resample_functor.h ops/resample_grad_functor.h
CPU_HEADERS := $(CORE_HEADERS) ops/resample_cpu.h

ARCH_FLAGS :=
ifeq ($(shell uname -m),x86_64)
# TensorFlow's x86 wheels require AVX already.
ARCH_FLAGS := -march=x86-64-v2 -mavx
endif
CXXFLAGS_OPS := -O3 -fPIC -Wall -Wextra -Wno-unused-parameter $(ARCH_FLAGS)

CUDA_GENCODE = $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	-gencode arch=compute_$(lastword $(CUDA_ARCHS)),code=compute_$(lastword $(CUDA_ARCHS))
NVCCFLAGS = -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC -DGOOGLE_CUDA=1 $(CUDA_GENCODE)

.PHONY: build-ops ops-lib deps test test-gpu bench clean-ops FORCE

build-ops: deps
	@$(MAKE) --no-print-directory ops-lib

deps:
	@$(PYTHON) ops/ensure_env.py

# Everything below needs TensorFlow's flags; they are cached in $(TF_MK),
# regenerated only when the installed TensorFlow changes.
ifneq ($(filter ops-lib $(LIB),$(MAKECMDGOALS)),)
$(shell $(PYTHON) ops/tf_id.py $(TF_ID) $(NVCC))
-include $(TF_MK)
endif

$(TF_MK): $(TF_ID) ops/tf_config.py
	@mkdir -p $(BUILD_DIR)
	@echo "Reading TensorFlow's build flags (cached in $(TF_MK))"
	@$(PYTHON) ops/tf_config.py $@ $(NVCC)

CPU_OBJS := $(BUILD_DIR)/resample_ops.o $(BUILD_DIR)/resample_kernels.o
ifeq ($(CUDA_ENABLED),1)
CUDA_OBJS := $(BUILD_DIR)/resample_kernels.cu.o
CUDA_DEFS := -DGOOGLE_CUDA=1 -isystem $(CUDA_HOME)/include
# Our CUDA runtime goes in statically, *before* TensorFlow's framework library
# (which exports its own CUDA runtime symbols), with its symbols kept private.
CUDA_LINK := -L$(CUDA_LIBDIR) -l:libcudart_static.a -ldl -lrt -lpthread -Wl,--exclude-libs,ALL
else
CUDA_OBJS :=
CUDA_DEFS :=
CUDA_LINK :=
endif

ops-lib: $(LIB)
ifeq ($(CUDA_ENABLED),1)
	@echo "Built $(LIB) for TensorFlow $(TF_VERSION) with CPU and CUDA kernels (archs: $(CUDA_ARCHS))."
else
	@echo "Built $(LIB) for TensorFlow $(TF_VERSION) with CPU kernels only; skipped CUDA: $(CUDA_SKIP_REASON)."
endif

$(BUILD_DIR)/resample_ops.o: ops/resample_ops.cc $(TF_MK)
	@mkdir -p $(BUILD_DIR)
	$(CXX) $(CXXFLAGS_OPS) $(TF_CFLAGS) -c $< -o $@

$(BUILD_DIR)/resample_kernels.o: ops/resample_kernels.cc $(CPU_HEADERS) $(TF_MK)
	@mkdir -p $(BUILD_DIR)
	$(CXX) $(CXXFLAGS_OPS) $(TF_CFLAGS) $(CUDA_DEFS) -c $< -o $@

$(BUILD_DIR)/resample_kernels.cu.o: ops/resample_kernels.cu.cc $(CORE_HEADERS) $(TF_MK)
	@mkdir -p $(BUILD_DIR)
	$(NVCC) $(NVCCFLAGS) -x cu -c $< -o $@

$(LIB): $(CPU_OBJS) $(CUDA_OBJS)
	$(CXX) -shared -o $@.tmp $^ $(CUDA_LINK) $(TF_LFLAGS) -Wl,-rpath,$(TF_LIBDIR)
	@mv $@.tmp $@

# Installs what the suite needs when missing (pytest and the optional extras it
# exercises), then runs it.
test:
	@$(PYTHON) ops/ensure_env.py --test
	$(PYTHON) -m pytest tests -q

# Standalone harness: CUDA kernels vs the CPU core, no TensorFlow needed.
GPU_HARNESS := $(BUILD_DIR)/gpu_harness
$(GPU_HARNESS): ops/gpu_harness.cu ops/resample_kernels.cu.cc $(CPU_HEADERS)
	@mkdir -p $(BUILD_DIR)
	$(NVCC) $(NVCCFLAGS) -o $@ ops/gpu_harness.cu -x cu ops/resample_kernels.cu.cc

test-gpu:
	@command -v $(NVCC) >/dev/null 2>&1 || { echo "make test-gpu needs the CUDA compiler '$(NVCC)' (set NVCC=...)"; exit 1; }
	@$(MAKE) --no-print-directory $(GPU_HARNESS)
	./$(GPU_HARNESS)

bench:
	@set -e; for m in $(BENCH_MODULES); do echo "== python -m $$m"; $(PYTHON) -m $$m; done

clean-ops:
	rm -rf $(BUILD_DIR) $(LIB)
