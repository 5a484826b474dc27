# One non-recursive GNU Makefile for the whole toolkit.
#
#   make                 build every tool into bin/ (CUDA parts when nvcc exists)
#   make test            build and run every test; ends with "N passed, N failed"
#   make test SAN=1      the same under AddressSanitizer + UBSan
#   make demo            the whole job on the small built-in default
#   make install PREFIX=/usr/local DESTDIR=
#   make uninstall | clean | lint
#
# Missing system packages (libzstd-dev, libyaml-dev, jq, ...) are installed by
# .ci/deps the first time anything is built.

PREFIX  ?= /usr/local
DESTDIR ?=
SHARED  ?= $(abspath ../shared)
VERSION := 0.1.0

CC      ?= cc
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=c11 -Wall -Wextra -fopenmp -MMD -MP -Ilib -DQLORA_VERSION='"$(VERSION)"'
LDLIBS  += -lzstd -lyaml -lm -lpthread
LDFLAGS += -fopenmp
ifdef SAN
CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
BUILD   ?= build-san
endif
BUILD   ?= build

TOOLS     := dolly-fmt tok pack nf4-quant lora-train lora-gen lora-merge
TOOL_SRC  := $(wildcard $(TOOLS:%=tools/%.c))
TOOL_BIN  := $(TOOL_SRC:tools/%.c=bin/%)
LIB_SRC   := $(wildcard lib/*.c)
LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB_A     := $(BUILD)/libqlora.a
TEST_SRC  := $(wildcard tests/unit/*.c)
TEST_BIN  := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)
GPU_TEST_SRC := $(wildcard tests/gpu/*.c)
MAN_PAGES := $(wildcard man/*.1 man/*.5 man/*.7)

# CUDA: built whenever nvcc is found; only lora-train and lora-gen link it.
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CU_SRC  := $(wildcard kernels/*.cu)
ifneq ($(NVCC),)
ifneq ($(CU_SRC),)
CUDA_HOME  ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS  ?= -O3 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
# Kernel objects carry no sanitizer, so both flavours share build/kernels.
CU_OBJ     := $(CU_SRC:%.cu=build/%.o)
GPU_LIBS   := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++
GPU_CFLAGS := -DQLORA_CUDA=1 -I$(CUDA_HOME)/include
GPU_TEST_BIN := $(GPU_TEST_SRC:tests/gpu/%.c=$(BUILD)/tests/gpu_%)
endif
endif

.PHONY: all test test-gpu demo install uninstall clean lint deps
# Keep object files of tests and kernels between runs.
.SECONDARY:
all: $(TOOL_BIN)

$(BUILD)/.deps-ok: .ci/deps
	@sh .ci/deps
	@mkdir -p $(@D) && touch $@

deps: $(BUILD)/.deps-ok

$(BUILD)/%.o: %.c | $(BUILD)/.deps-ok
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(GPU_CFLAGS) -c -o $@ $<

build/kernels/%.o: kernels/%.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -Ilib -MMD -MP -c -o $@ $<

$(LIB_A): $(LIB_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^

# The GPU tools get the kernels; the others never link them.
bin/lora-train bin/lora-gen: GPU_OBJ = $(CU_OBJ)
bin/lora-train bin/lora-gen: GPU_LINK = $(GPU_LIBS)
bin/lora-train bin/lora-gen: $(CU_OBJ)

# bin/ holds the tools of the last flavour built (plain or SAN=1); the
# stamp names it, so switching flavours relinks every tool.
FLAVOUR := bin/.built-in-$(BUILD)
$(FLAVOUR):
	@mkdir -p $(@D) && rm -f bin/.built-in-* && touch $@

bin/%: $(BUILD)/tools/%.o $(LIB_A) $(FLAVOUR)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $< $(GPU_OBJ) $(LIB_A) $(LDLIBS) $(GPU_LINK)

$(BUILD)/tests/%: $(BUILD)/tests/unit/%.o $(LIB_A)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $< $(LIB_A) $(LDLIBS)

# Kernel tests: each compares a CUDA kernel with its CPU reference; they run
# under `make test-gpu` (and exit 77, skipped, where there is no GPU).
$(BUILD)/tests/gpu_%: $(BUILD)/tests/gpu/%.o $(CU_OBJ) $(LIB_A)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $< $(CU_OBJ) $(LIB_A) $(LDLIBS) $(GPU_LIBS)

# --- test fixtures (issue 10, e2e) --------------------------------------
# $(BUILD)/mkfixture builds the tokenizer and tiny random Llama checkpoint
# that the tests and `make demo` use when nothing can be downloaded.
FIXTURE_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(wildcard tests/fixtures/*.c))
$(BUILD)/mkfixture: $(FIXTURE_OBJ) $(LIB_A)
	$(CC) $(LDFLAGS) -o $@ $(FIXTURE_OBJ) $(LIB_A) $(LDLIBS)
test test-gpu demo: $(BUILD)/mkfixture
-include $(FIXTURE_OBJ:.o=.d)
# --- end of test fixtures ---------------------------------------------------

# --- fuzzing (issue 11, hardening) ----------------------------------------
# `make fuzz` builds one libFuzzer harness per parser, tests/fuzz/fuzz_X.c ->
# build/fuzz/fuzz_X, with clang (ASan + UBSan), against its own instrumented
# copy of lib/ (portable code paths: clang 14 knows no "f16c" CPU feature).
# tests/fuzz/run.sh makes the seed corpora and runs them.
FUZZ_CC     ?= clang
FUZZ_SAN    := address,undefined
FUZZ_CFLAGS := -g -O1 -std=c11 -Wall -Wextra -fopenmp -Ilib -fno-omit-frame-pointer \
               -DQLORA_VERSION='"$(VERSION)"' -fno-sanitize-recover=undefined
FUZZ_SRC    := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BIN    := $(FUZZ_SRC:tests/fuzz/%.c=build/fuzz/%)
FUZZ_LIB    := $(LIB_SRC:%.c=build/fuzz/%.o)
.PHONY: fuzz
fuzz: $(FUZZ_BIN)
build/fuzz/lib/%.o: lib/%.c lib/*.h
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,$(FUZZ_SAN) \
	    -Wno-pass-failed -Wno-unknown-pragmas -Wno-string-plus-int \
	    '-D__builtin_cpu_supports(f)=0' -c -o $@ $<
build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(FUZZ_LIB)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer,$(FUZZ_SAN) -o $@ $< $(FUZZ_LIB) $(LDLIBS)
# --- end of fuzzing ----------------------------------------------------------

test: all $(TEST_BIN) $(GPU_TEST_BIN)
	@BUILD=$(BUILD) SHARED=$(SHARED) sh tests/run.sh

test-gpu: all $(TEST_BIN) $(GPU_TEST_BIN)
	@BUILD=$(BUILD) SHARED=$(SHARED) GPU=1 sh tests/run.sh

demo: all
	@sh examples/demo.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
	    $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/man/man7
	install -m 755 $(TOOL_BIN) $(DESTDIR)$(PREFIX)/bin/
	for p in $(MAN_PAGES); do \
	    s=$${p##*.}; install -m 644 $$p $(DESTDIR)$(PREFIX)/share/man/man$$s/; done

uninstall:
	rm -f $(TOOLS:%=$(DESTDIR)$(PREFIX)/bin/%)
	for p in $(notdir $(MAN_PAGES)); do \
	    s=$${p##*.}; rm -f $(DESTDIR)$(PREFIX)/share/man/man$$s/$$p; done

clean:
	rm -rf build build-san bin

lint:
	@command -v mandoc >/dev/null && mandoc -Tlint -W warning $(MAN_PAGES) || true
	@command -v clang-format >/dev/null && clang-format --dry-run --Werror \
	    lib/*.c lib/*.h tools/*.c tests/unit/*.c 2>&1 | head -50 || true
	$(CC) $(filter-out -MMD -MP,$(CFLAGS)) $(GPU_CFLAGS) -fsyntax-only -Werror $(LIB_SRC) $(TOOL_SRC)

-include $(LIB_OBJ:.o=.d) $(TOOL_SRC:tools/%.c=$(BUILD)/tools/%.d) \
         $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/unit/%.d) $(CU_OBJ:.o=.d)
