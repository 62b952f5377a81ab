# kubetriage: `make demo` shows it working, `make test` proves it. Both install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .make/pip-installed
PYTEST_ARGS ?=

.PHONY: FORCE help deps demo-deps system-deps control-plane helm lint test demo bench eval crds image kind-up clean

help:
	@echo "make demo          run the pipeline locally on the examples (no API key needed)"
	@echo "make test          install what is missing, then lint and run every test"
	@echo "make bench         throughput / latency / API-write benchmarks (not part of test)"
	@echo "make eval          precision/recall of the analyzers on tests/data/eval_cases.yaml"
	@echo "make crds          regenerate crds/ from operator/kubetriage/api/models.py"
	@echo "make image         build the container image (needs a Docker engine)"
	@echo "make kind-up       create a kind cluster and install the chart (needs Docker + kind)"

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

lint: $(STAMP)
	@echo "[lint] ruff + CRD drift"
	@$(PYTHON) -m ruff check operator analyzers devharness tests bench hack
	@$(PYTHON) -m devharness.crdgen --check

test: deps lint
	@echo "[test] pytest against real kube-apiserver/etcd, Redis, PostgreSQL, SQLite"
	@$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: demo-deps
	@$(PYTHON) -m devharness.demo

bench: deps
	@$(PYTHON) -m bench.run

eval: $(STAMP)
	@$(PYTHON) -m bench.eval

crds: $(STAMP)
	@$(PYTHON) -m devharness.crdgen

image:
	docker build -t kubetriage:$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2) .

kind-up:
	kind create cluster --name kubetriage
	$(MAKE) image
	kind load docker-image --name kubetriage kubetriage:$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2)
	helm upgrade --install kubetriage charts/kubetriage --namespace kubetriage --create-namespace \
		--set image.repository=kubetriage --set image.tag=$$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2) \
		--set image.pullPolicy=Never

clean:
	rm -rf .make .pytest_cache .ruff_cache build *.egg-info
