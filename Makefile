# kubetriage: `make demo` shows it working, `make test` proves it. Both install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .make/pip-installed
PYTEST_ARGS ?=

.PHONY: FORCE help deps demo-deps system-deps control-plane helm lint test demo bench bench-scale eval crds image kind-up clean

help:
	@echo "make demo          run the pipeline locally on the examples (no API key needed)"
	@echo "make test          install what is missing, then lint and run every test"
	@echo "make bench         throughput / latency / API-write benchmarks (not part of test)"
	@echo "make bench-scale   operator and Redis memory with 100k TriageJobs present (minutes)"
	@echo "make eval          verdict quality on the tuning and frozen splits (tests/data/eval_*.yaml)"
	@echo "make crds          regenerate crds/ from operator/kubetriage/api/models.py"
	@echo "make image         build the container image (Docker, or buildah without Docker)"
	@echo "make kind-up       create a kind cluster and install the chart (needs Docker + kind)"
	@echo "make cluster       a real single-node cluster here with the chart installed (root, no Docker)"
	@echo "make cluster-down  remove that cluster and every host change it made"

# Reinstall when pyproject.toml changed, or when the editable install points at another checkout
# (pip install -e in a second clone silently redirects `import kubetriage` there).
$(STAMP): pyproject.toml FORCE
	@if [ ! -f $(STAMP) ] || [ pyproject.toml -nt $(STAMP) ] || \
	    [ "$$($(PYTHON) -c 'import kubetriage.api as a, os; print(os.path.dirname(os.path.realpath(a.__file__)))' 2>/dev/null)" != "$(CURDIR)/operator/kubetriage/api" ]; then \
	  echo "[deps] pip install -e .[test]"; \
	  $(PIP) install -q --disable-pip-version-check -e ".[test]" && mkdir -p .make && touch $(STAMP); \
	fi

FORCE:

deps: $(STAMP) system-deps control-plane helm

# `make demo` needs less than `make test`: no helm, Prometheus, Alertmanager or PostgreSQL.
demo-deps: $(STAMP) control-plane
	@bash hack/system-deps.sh demo

system-deps:
	@bash hack/system-deps.sh

control-plane:
	@echo "[deps] control-plane binaries (cached after the first build)"
	@bash hack/control-plane.sh >/dev/null

helm:
	@echo "[deps] helm (built from its pinned Go module, cached after the first build)"
	@bash hack/helm.sh >/dev/null

.PHONY: node-deps cluster cluster-down test-node
# The real node of tests/test_node_e2e.py: Debian's containerd/runc/CNI/buildah, and kubelet,
# kube-controller-manager, kube-scheduler, kube-proxy, CoreDNS built once from pinned modules.
# Only as root: elsewhere the end-to-end tests skip (and say why).
node-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "[deps] real-node packages and binaries (cached after the first build)"; \
	  bash hack/node.sh packages && bash hack/node.sh >/dev/null; \
	else echo "[deps] not root: no real node here, the end-to-end tests will skip"; fi

lint: $(STAMP)
	@echo "[lint] ruff + CRD drift"
	@$(PYTHON) -m ruff check operator analyzers devharness tests bench hack
	@$(PYTHON) -m devharness.crdgen --check

test: deps lint
	@echo "[test] pytest against real kube-apiserver/etcd, Redis, PostgreSQL, SQLite"
	@$(PYTHON) -m pytest $(PYTEST_ARGS)

# The chart on a real single-node cluster (root): not yet part of `make test`, see tests/test_node_e2e.py.
test-node: deps node-deps
	@echo "[test] end-to-end on a real node: image, helm install, real pods"
	@KUBETRIAGE_NODE_E2E=1 KUBETRIAGE_REQUIRE_NODE=1 $(PYTHON) -m pytest tests/test_node_e2e.py $(PYTEST_ARGS)

demo: demo-deps
	@$(PYTHON) -m devharness.demo

bench: deps
	@$(PYTHON) -m bench.run

bench-scale: deps
	@$(PYTHON) -m bench.scale

eval: $(STAMP)
	@$(PYTHON) -m bench.eval

crds: $(STAMP)
	@$(PYTHON) -m devharness.crdgen

# Docker where present, buildah otherwise (same Dockerfile). PYTHON_IMAGE=... overrides the base, e.g.
# PYTHON_IMAGE=$$(python3 -m devharness.images base) for the locally made Debian base. No --layers for
# buildah: 1.28 reuses the final stage's `RUN --mount=...,from=builder` layer when only the builder's
# output changed, i.e. it would ship stale code.
image:
	@v=$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2); \
	if command -v docker >/dev/null 2>&1; then \
	  docker build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t kubetriage:$$v .; \
	elif command -v buildah >/dev/null 2>&1; then \
	  buildah bud $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t kubetriage:$$v .; \
	else echo "make image needs Docker or buildah (apt-get install buildah)"; exit 1; fi

kind-up:
	kind create cluster --name kubetriage
	$(MAKE) image
	kind load docker-image --name kubetriage kubetriage:$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2)
	helm upgrade --install kubetriage charts/kubetriage --namespace kubetriage --create-namespace \
		--set image.repository=kubetriage --set image.tag=$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2) \
		--set image.pullPolicy=Never

# A real single-node cluster on this machine (kubelet, containerd, bridge CNI), the image built with
# buildah and the chart installed: for users without Docker. Needs root; changes host networking while
# it runs (an address on lo, a bridge, iptables rules); `make cluster-down` undoes all of it.
cluster: $(STAMP) control-plane helm node-deps
	@$(PYTHON) -m devharness.cluster up

cluster-down: $(STAMP)
	@$(PYTHON) -m devharness.cluster down

clean:
	rm -rf .make .pytest_cache .ruff_cache build *.egg-info
