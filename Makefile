# tungate — build, test, lint and benchmark.
#
#   make deps     install missing system packages / rustup components (idempotent)
#   make all      build each variant in its own cargo invocation (one backend feature each),
#                 in the release and the `size` profile, then print the size table and
#                 write results/sizes.csv (scripts/sizes.sh)
#   make test     all + the whole workspace test suite, including the ignored (netns) tests
#   make bench    all + scripts/bench.sh (results/latest.md, results/latest.json)
#   make lint     rustfmt check + clippy -D warnings + rustdoc -D warnings
#   make soak     every TUN variant under mixed load for SOAK_MINUTES (30) each, RSS/fds/
#                 flows sampled every 10 s into results/soak-<date>/; fails on growth > 10 %
#   make fuzz     every cargo-fuzz target for FUZZ_SECONDS (600) or FUZZ_RUNS (10 M) each,
#                 corpora minimised, results/fuzz-<date>.md (nightly; `make test` replays
#                 the committed corpora on stable)
#   make publish-check  `cargo publish --dry-run` of every library crate (the workspace at
#                 once: each depends on unpublished siblings, which cargo overlays locally)
#   make clean
#
# Variables: VARIANTS (backends to build), BENCH_VARIANTS (passed to bench.sh; default:
# every target/release/tungate-* present), CARGO.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# CI's environment may lack ~/.cargo/bin on PATH.
ifeq ($(shell command -v cargo 2>/dev/null),)
export PATH := $(HOME)/.cargo/bin:$(PATH)
endif

CARGO ?= cargo
VARIANTS ?= smoltcp lwip ipstack netstack-smoltcp system redirect
BENCH_VARIANTS ?=
RELEASE_DIR := $(CURDIR)/target/release

.PHONY: all build deps test bench soak fuzz lint fmt-check clippy doc sizes publish-check clean

all: deps
	@$(MAKE) --no-print-directory build

deps:
	scripts/install-deps.sh

# Separate invocations so features never leak between variants; each variant's binary
# has its own name, so the builds do not overwrite each other's output.
# `cargo fetch` first: backend-lwip's build script compiles lwIP's C sources from the
# `lwip` package that Cargo.lock pins, which only a fetch downloads (it is never built).
# Then each variant again in the `size` profile (Cargo.toml: opt-level "z", LTO, one
# codegen unit, panic = "abort"; target/size/), for the size table and results/sizes.csv.
# SIZE_PROFILE=0 skips those builds (the table then shows them missing).
SIZE_PROFILE ?= 1
build:
	$(CARGO) fetch --locked
	@n=0; for v in $(VARIANTS); do n=$$((n + 1)); \
	  echo "==> [$$n/$(words $(VARIANTS))] cargo build --release tungate-$$v"; \
	  $(CARGO) build --release --locked -p tungate --no-default-features --features "$$v" --bin "tungate-$$v"; \
	done
	@if [ "$(SIZE_PROFILE)" = 1 ]; then n=0; for v in $(VARIANTS); do n=$$((n + 1)); \
	  echo "==> [$$n/$(words $(VARIANTS))] cargo build --profile size tungate-$$v"; \
	  $(CARGO) build --profile size --locked -p tungate --no-default-features --features "$$v" --bin "tungate-$$v"; \
	done; fi
	@scripts/sizes.sh $(VARIANTS)

sizes:
	@scripts/sizes.sh $(VARIANTS)

test: deps all
	TUNGATE_BIN_DIR=$(RELEASE_DIR) $(CARGO) test --workspace --release --locked -- --include-ignored

bench: deps all
	scripts/bench.sh $(BENCH_VARIANTS)

# SOAK_VARIANTS: a subset of the TUN variants (default: all five).
SOAK_MINUTES ?= 30
SOAK_VARIANTS ?=
soak: deps all
	$(CARGO) build --release --locked -p tungate-testkit --bin tungate-soak
	TUNGATE_BIN_DIR=$(RELEASE_DIR) $(RELEASE_DIR)/tungate-soak --minutes $(SOAK_MINUTES) $(SOAK_VARIANTS)

# FUZZ_TARGETS: a subset of fuzz/fuzz_targets (default: all).
FUZZ_TARGETS ?=
fuzz: deps
	scripts/fuzz.sh $(FUZZ_TARGETS)

lint: fmt-check clippy doc

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features --release --locked -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --all-features --locked

publish-check:
	$(CARGO) publish --dry-run --workspace --locked

clean:
	$(CARGO) clean
