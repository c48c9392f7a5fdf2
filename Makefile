# The README names `make demo` and `make test`; the rest are their parts.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Everything cached outside the checkout: Go-built control plane, Python
# venvs, and one shared cargo target dir, so later runs (and CI) are fast.
export CNLB_CACHE ?= $(HOME)/.cache/cnlb
export CARGO_TARGET_DIR ?= $(CNLB_CACHE)/target
CARGO ?= cargo
# The binaries `cargo build --workspace --bins` made: `cargo run -p` would
# resolve features for one package and build aws-sdk-ec2 a second time.
BIN := $(CARGO_TARGET_DIR)/debug
ENV := $(BIN)/cnlb-env

.PHONY: chaos demo demo-deps debian-deps build test fuzz trim-target env-deps env-up env-check env-down images lint fmt bench-aws bench-gcp bench-ipam bench-memory bench-nodes

## demo: set up, build, then run the on-prem demo on real Nodes (HAProxy load balancer straight to Pod IPs; Ctrl-C stops it)
demo: trim-target demo-deps build
	$(ENV) down
	@echo "==> Running the demo (cnlb-demo)"
	$(BIN)/cnlb-demo $(DEMO_ARGS)

## debian-deps: Debian packages the build and the environment need (nftables headers, CNI plugins, HAProxy, runc)
debian-deps:
	@echo "==> Installing Debian packages (libnftnl-dev, containernetworking-plugins, haproxy, runc, ...) if missing"
	localstack-tests/scripts/install-deps.sh

build: debian-deps
	@echo "==> Building cnlb (cargo build --workspace --bins): the first time this takes about 8 minutes"
	$(CARGO) build --workspace --bins

## demo-deps: what the demo needs: Kubernetes (control plane, kubelet), containerd and helm (go build)
demo-deps: debian-deps
	@echo "==> Building Kubernetes, containerd and helm from source: the first time this takes about 7 minutes"
	localstack-tests/scripts/build-control-plane.sh
	localstack-tests/scripts/build-containerd.sh
	localstack-tests/scripts/build-helm.sh

## images: cnlb's images (cnlb-ccm, vpc-ipam, cnlb-onprem-haproxy) as OCI archives in IMAGES_DIR (default $(CNLB_CACHE)/target/images)
IMAGES_DIR ?= $(CARGO_TARGET_DIR)/images
images: build
	$(ENV) images --out $(IMAGES_DIR)

## env-up: set up, start the local environment (control plane, 3 real Nodes, AWS emulators) and print how to reach it (Ctrl-C stops it)
env-up: env-deps build
	$(ENV) up

## test: lint, set up and run every test (unit and integration) against the real parts
test: trim-target lint env-deps build
	$(ENV) down
	$(CARGO) test --workspace --no-fail-fast

## fuzz: only the property tests of the parsers of outside input, FUZZ_CASES cases each (default 20000), then the cases each ran
fuzz: debian-deps
	@status=0; log=$$(mktemp); \
	PROPTEST_CASES=$${FUZZ_CASES:-20000} $(CARGO) test --workspace --lib --test properties \
		-- properties --nocapture 2>&1 | tee $$log || status=$$?; \
	echo "==> Cases run per property test ($$SECONDS s):"; \
	grep -o 'properties: [a-z_]*: [0-9]* cases' $$log | sort || true; \
	rm -f $$log; exit $$status

## trim-target: drop the shared cargo target dir's debug build once it passes CNLB_TARGET_LIMIT_GIB (default 30)
trim-target:
	localstack-tests/scripts/trim-target.sh

## env-deps: Kubernetes, containerd and helm (go build), the Gateway API CRDs (Go module), emulator venvs
env-deps: debian-deps
	@echo "==> Building Kubernetes, containerd and helm from source and the emulators'"
	@echo "    Python venvs: the first time this takes about 7 minutes"
	localstack-tests/scripts/python-venvs.sh > >(sed 's/^/[venvs] /') & venvs=$$!; \
	localstack-tests/scripts/build-control-plane.sh; \
	localstack-tests/scripts/build-containerd.sh; \
	localstack-tests/scripts/build-helm.sh; \
	localstack-tests/scripts/fetch-gateway-api.sh; \
	wait $$venvs

## env-check: start everything, print start time and memory, stop
env-check: env-deps build
	$(ENV) up --check

## env-down: kill and remove what a killed test left behind
env-down: build
	$(ENV) down

## bench-aws: for N in BENCH_SERVICES (20 100), N Services x 50 endpoints through cnlb-ccm and moto behind the account's documented rate limits scaled by BENCH_LIMITS (1; empty: none)
BENCH_SERVICES ?= 20 100
BENCH_LIMITS ?= 1
LB_BENCH = $(BIN)/cnlb-bench-lb $(if $(BENCH_LIMITS),--account-limits $(BENCH_LIMITS)) $(BENCH_ARGS)
bench-aws: env-deps build
	for n in $(BENCH_SERVICES); do $(LB_BENCH) --provider aws --services $$n || exit 1; done

## bench-gcp: the same with real Pods through cnlb-ccm and the GCE emulator
bench-gcp: env-deps build
	for n in $(BENCH_SERVICES); do $(LB_BENCH) --provider gcp --services $$n || exit 1; done

## bench-memory: cnlb-ccm's peak RSS and CPU per 1,000 endpoint changes with 10,000 Services x 25 endpoints (EndpointSlices written directly; the in-memory provider over the plugin protocol), release build (a debug build's code adds about 28 MiB: `$(BIN)/cnlb-bench-memory`); BENCH_ARGS="--services N --endpoints M"
bench-memory: env-deps
	$(RELEASE_BUILD)
	$(CARGO_TARGET_DIR)/release/cnlb-bench-memory $(BENCH_ARGS)

## bench-nodes: N Nodes (default 1000, BENCH_ARGS="--nodes 1000") initialized by cnlb-ccm from EC2 instances in moto: time, DescribeInstances per period
bench-nodes: env-deps build
	$(BIN)/cnlb-bench-nodes $(BENCH_ARGS)

# The release builds of the benchmarks: one set of packages, so that their
# dependencies are built once, with the same features.
RELEASE_BUILD = $(CARGO) build --release -p cnlb-ccm -p cnlb-vpc-ipam -p cnlb-localstack-tests --bins

## bench-ipam: vpc-ipam ADD latency (plugin alone, through ptp, cold pool on moto), EC2 calls per Pod, allocations/s, bursts of 100 ADDs at 10 and 50/s on a default pool behind EC2's documented limits
# Release builds: the plugin is a process started per CNI command, so its
# start-up and the agent's answer are what is measured.
bench-ipam: env-deps
	$(RELEASE_BUILD)
	$(CARGO_TARGET_DIR)/release/cnlb-bench-ipam $(BENCH_ARGS)

## chaos: the long fault trials: 50 Services converging with 30 % of cloud calls failing, 100 SIGKILLs of cnlb-ccm (AWS, GCP) and of vpc-ipam-agent under churn
# `make test` runs the same tests small; these variables scale them.
CNLB_CHAOS_TRIALS ?= 100
CNLB_CHAOS_SERVICES ?= 50
chaos: env-deps build
	CNLB_CHAOS_TRIALS=$(CNLB_CHAOS_TRIALS) CNLB_CHAOS_SERVICES=$(CNLB_CHAOS_SERVICES) \
	$(CARGO) test --workspace --tests -- chaos --nocapture --test-threads=1

## lint: formatting and clippy, warnings as errors
lint: debian-deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
