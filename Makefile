# keyway — the two commands a user needs first: `make demo` and `make test`.
#
# Every target that needs system packages installs them itself (`make deps`): CI and new machines
# start with none of them.

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build, the tests and the lab need (clang and libbpf-dev: keyway's eBPF
# programs, compiled by sap/build.rs with clang's BPF target against libbpf's headers).
APT_PACKAGES := build-essential pkg-config protobuf-compiler iproute2 iputils-ping nftables \
	tcpdump tshark containerd runc containernetworking-plugins procps util-linux psmisc iperf3 \
	ca-certificates clang libbpf-dev
FUZZ_RUNS ?= 1000000
SOAK_MINUTES ?= 30

.PHONY: all deps build image test lint unit demo bench soak fuzz clean manifests

all: build

# Installs what is missing (apt-get update first, as a fresh machine needs).
# kubectl (for `kubectl kustomize`) and a Python with venv are taken from wherever they already
# are; Debian's packages only when they are missing.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3 python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Every binary of the workspace, once, statically linked (.cargo/config.toml): the lab, the
# tests and keyway's image all run these. They land in $(BIN).
BIN := target/x86_64-unknown-linux-gnu/release

build: deps
	$(CARGO) build --release --workspace --bins

# keyway's cluster image, the one manifests/ run (keyway:0.1.0), as a `docker save` tarball:
# target/keyway-image.tar, for `docker load`, `podman load` or `ctr -n k8s.io image import`.
image: build
	$(BIN)/keyway-lab image --bin-dir $(BIN) --out target/keyway-image.tar

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test: unit, property, namespaced integration, CNI spec, CRI and lab conformance tests.
# Namespaced tests need root; with CI set they fail instead of skipping.
test: deps lint build manifests
	$(CARGO) test --workspace --release -- --test-threads=2

# Every manifest rendered by kustomize and validated offline (no API server needed).
manifests: deps
	./scripts/validate-manifests

unit:
	$(CARGO) test --workspace --lib

# The paper's topology end to end on simulated nodes: matrices, paths, bench, then nothing left.
demo: build
	KEYWAY_BIN=$(BIN) ./scripts/demo

# Criterion benches of the data-plane core, then the ratios to each group's baseline.
bench:
	$(CARGO) bench -p keyway-core --bench dataplane
	./scripts/bench-ratios

# Everything at once for SOAK_MINUTES on a two-node lab (traffic on every path, pod churn with
# policies, key rotation every 10 s, agent SIGKILLs): see conformance/README.md. Exits 1 when an
# invariant did not hold.
soak: build
	$(BIN)/keyway-lab soak --minutes $(SOAK_MINUTES)

# Fuzz each target for FUZZ_RUNS executions (libFuzzer, coverage-guided; needs the nightly
# toolchain; installs cargo-fuzz if missing): every decoder that takes outside input. Each
# target's corpus grows in its fuzz/corpus/TARGET; the file source's starts from the lab's YAML.
# `make test` runs the same checks for a few seconds each on stable (conformance/tests/fuzz.rs).
FUZZ_TARGETS := sap/core/fuzz:gue_decapsulate sap/core/fuzz:classify \
	cni-plugin/protocol/fuzz:handoff_decode cni-plugin/fuzz:cni_config \
	node-agent/fuzz:file_source
FUZZ_SEEDS_file_source := ../../conformance/netpol ../../examples
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in $(FUZZ_TARGETS); do \
		dir=$${t%%:*}; target=$${t##*:}; \
		seeds=$$(case $$target in file_source) echo "$(FUZZ_SEEDS_file_source)";; esac); \
		mkdir -p $$dir/corpus/$$target; \
		(cd $$dir && $(CARGO) +nightly fuzz run $$target corpus/$$target $$seeds -- -runs=$(FUZZ_RUNS)) || exit 1; \
	done

clean:
	$(CARGO) clean
