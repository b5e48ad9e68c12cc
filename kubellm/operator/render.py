"""render(isvc) → the child manifests of one InferenceService: Deployment, Service, HPA, PDB, NetworkPolicy.

Pure (no I/O): every spec → manifest rule is a unit test. Children carry owner references and one label set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from urllib.parse import urlsplit

from kubellm import tracing
from kubellm.operator.spec import GROUP, KIND, VERSION, InferenceServiceSpec, ModelSource, parse_spec
from kubellm.settings import engine_flag

DEFAULT_IMAGE = os.environ.get("KUBELLM_RUNTIME_IMAGE", "ghcr.io/kubellm/kubellm-runtime:0.1.0")
# the operator's setting (the chart's tracing.otlpTracesEndpoint): every runtime pod exports spans there
OTLP_TRACES_ENDPOINT = tracing.traces_endpoint(os.environ.get("KUBELLM_OTLP_TRACES_ENDPOINT"), {})
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _operator_namespace() -> str:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip()
    except OSError:  # outside a pod
        return "kubellm-system"


OPERATOR_NAMESPACE = _operator_namespace()
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kubellm-operator"}  # manifests/operator.yaml, the chart
ROUTER_POD_LABELS = {"app.kubernetes.io/name": "kubellm-router"}  # the chart's router.enabled
MANAGED_BY = "kubellm-operator"
ISVC_LABEL = "kubellm.io/inferenceservice"
# on the Deployment while its replicas are held at 0 because the model does not fit (operator/fit_plan.py)
HOLD_ANNOTATION = "kubellm.io/fit-hold"
HTTP_PORT = 8000
MODEL_ROOT = "/models"
ADAPTER_ROOT = "/adapters"  # where adapters' claims other than the model's are mounted
ADAPTER_DOWNLOADS = "/adapter-downloads"  # hf:// and s3:// adapters, fetched by init containers
ADAPTER_DOWNLOAD_LIMIT = "8Gi"
LORA_SLOT_STEP = 4
API_KEYS_DIR = "/etc/kubellm/api-keys"
ADMIN_KEY_DIR = "/etc/kubellm/admin-key"  # the operator's key for the pods' adapter endpoints (admin_key_secret)
PRESTOP_SECONDS = 5  # let endpoints drop the pod before SIGTERM reaches the server
QUEUE_METRIC = "kubellm_num_requests_waiting"
INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
# the endpoint picker maps a pod's metric names by this label: ours are vLLM's (gauges, counters, histograms)
ENGINE_TYPE_LABEL = {"llm-d.ai/engine-type": "vllm"}
# requests and limits a container gets for what the CR leaves unset: enough to start a small model on CPU,
# bounded so that one pod cannot take a node's memory; no CPU limit (throttling stalls the engine's step loop)
RUNTIME_DEFAULTS = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "16Gi"}}
INIT_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
# what the downloader reads from model.credentialsSecret (huggingface_hub, boto3)
CREDENTIAL_KEYS = (
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)
TMP_SIZE_LIMIT = "4Gi"  # HF and Triton caches, tokenizer files
SHM_GIB_PER_GPU = 2  # /dev/shm (memory-backed) for the tensor-parallel workers' shared tensors
RUNTIME_CONTAINER = "runtime"  # `kubellm serve`: the operator reads its start-up phase from its log
FETCH_CONTAINER = "fetch-model"  # the downloader's container name: the operator reads its log for progress
WAIT_CONTAINER = "wait-for-model"  # a replica's init container while the model cache's Job fills the claim
CACHE_LABELS = {"app.kubernetes.io/name": "kubellm-model-cache", "app.kubernetes.io/component": "model-cache"}
CACHE_URI_ANNOTATION = "kubellm.io/model-uri"
CACHE_JOB_BACKOFF_LIMIT = 6
# the cache Job's downloader leaves the model's config here (the Kubernetes default terminationMessagePath); the
# operator reads it from the pod's status for the fit check before any replica starts (operator/fit_plan.py)
CACHE_TERMINATION_MESSAGE = "/dev/termination-log"
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def labels_for(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubellm-runtime",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ISVC_LABEL: name,
    }


def selector_for(name: str) -> dict[str, str]:
    return {ISVC_LABEL: name, "app.kubernetes.io/name": "kubellm-runtime"}


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local"


def admin_key_secret(name: str) -> str:
    """The Secret with the key that alone may load and unload a service's adapters (the pods' --admin-key-file):
    made by the operator with a random key (Reconciler.admin_key), so that API clients cannot swap adapters."""
    return f"{name}-admin-key"


def render_admin_key_secret(isvc: dict, key: str) -> dict:
    metadata = {**_metadata(isvc), "name": admin_key_secret(isvc["metadata"]["name"])}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": {"key": key}}


def _owner(isvc: dict) -> dict:
    meta = isvc["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(isvc: dict, extra_labels: dict | None = None) -> dict:
    meta = isvc["metadata"]
    return {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "labels": {**labels_for(meta["name"]), **(extra_labels or {})},
        "ownerReferences": [_owner(isvc)],
    }


def model_location(model: ModelSource, cache_claim: str) -> tuple[str, dict, dict | None]:
    """(model dir in the container, volume, init container) for a model: a pvc:// model is mounted; an hf:// or
    s3:// model is downloaded by the pod's init container into an emptyDir, or, with model.cache, waited for in
    the cache claim the cache Job fills (`cache_claim`, mounted read-only)."""
    scheme, _, rest = model.uri.partition("://")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return f"{MODEL_ROOT}/{path}".rstrip("/"), volume, None
    if model.cache.enabled:
        model_dir = f"{MODEL_ROOT}/{cache_subdir(model.uri)}"
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": cache_claim, "readOnly": True}}
        wait = {"name": WAIT_CONTAINER, "command": ["kubellm", "wait-for-model", model.uri, model_dir]}
        return model_dir, volume, wait
    volume = {"name": "model", "emptyDir": {}}  # its sizeLimit: model.downloadSizeLimit
    fetch = {"name": FETCH_CONTAINER, "command": ["kubellm", "fetch-model", model.uri, f"{MODEL_ROOT}/model"]}
    return f"{MODEL_ROOT}/model", volume, fetch


def _claim_path(uri: str) -> tuple[str, str]:
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, path.strip("/")


def _adapter_claims(spec: InferenceServiceSpec) -> dict[str, str]:
    """claim → its mount point, for the adapters' claims other than the model's (mounted at MODEL_ROOT already)."""
    model_claim = _claim_path(spec.model.uri)[0] if spec.model.uri.startswith("pvc://") else None
    claims = sorted({_claim_path(a.uri)[0] for a in spec.adapters if a.uri.startswith("pvc://")} - {model_claim})
    return {claim: f"{ADAPTER_ROOT}/{claim}" for claim in claims}


def downloaded_adapters(spec: InferenceServiceSpec) -> list:
    """The hf:// and s3:// adapters: fetched at pod start, so these (unlike pvc:// ones) are in the pod template."""
    return [a for a in spec.adapters if not a.uri.startswith("pvc://")]


def adapter_paths(spec: InferenceServiceSpec) -> dict[str, str]:
    """Each adapter's directory inside the runtime container: what the operator asks the pods to load."""
    mounted = _adapter_claims(spec)
    paths = {}
    for a in spec.adapters:
        if not a.uri.startswith("pvc://"):
            paths[a.name] = f"{ADAPTER_DOWNLOADS}/{a.name}"
            continue
        claim, path = _claim_path(a.uri)
        paths[a.name] = f"{mounted.get(claim, MODEL_ROOT)}/{path}"
    return paths


def lora_slots(spec: InferenceServiceSpec) -> int:
    """--max-loras: runtime.maxLoras, else the adapters' count rounded up to a multiple of LORA_SLOT_STEP (0: off).
    Rounded so that adding an adapter seldom changes the pod template (which would roll the pods)."""
    if spec.runtime.max_loras:
        return spec.runtime.max_loras
    return -(-len(spec.adapters) // LORA_SLOT_STEP) * LORA_SLOT_STEP


def _adapter_volumes(spec: InferenceServiceSpec) -> tuple[list[dict], list[dict]]:
    volumes, mounts = [], []
    for i, (claim, at) in enumerate(_adapter_claims(spec).items()):
        volumes.append({"name": f"adapters-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"adapters-{i}", "mountPath": at, "readOnly": True})
    if downloaded_adapters(spec):
        volumes.append({"name": "adapter-downloads", "emptyDir": {"sizeLimit": ADAPTER_DOWNLOAD_LIMIT}})
        mounts.append({"name": "adapter-downloads", "mountPath": ADAPTER_DOWNLOADS, "readOnly": True})
    return volumes, mounts


def _adapter_fetchers(spec: InferenceServiceSpec, image: str) -> list[dict]:
    """One init container per hf:// or s3:// adapter: `kubellm fetch-model URI DIR` with the model's credentials."""
    paths = adapter_paths(spec)
    return [
        {
            "name": f"fetch-adapter-{i}",
            "image": image,
            "command": ["kubellm", "fetch-model", a.uri, paths[a.name]],
            "env": downloader_env(spec),
            "volumeMounts": [
                {"name": "adapter-downloads", "mountPath": ADAPTER_DOWNLOADS},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "resources": INIT_RESOURCES,
            "securityContext": CONTAINER_SECURITY,
        }
        for i, a in enumerate(downloaded_adapters(spec))
    ]


def _placement(sched) -> dict:
    """Where a pod may run (nodeSelector, tolerations, affinity): the replicas' and the cache Job's alike."""
    out: dict = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = list(sched.tolerations)
    if sched.affinity:
        out["affinity"] = sched.affinity
    return out


def cache_subdir(uri: str) -> str:
    """The model's directory in the cache claim: one per URI, so a changed URI never reads the old copy."""
    return "m-" + hashlib.sha256(uri.encode()).hexdigest()[:16]


def serve_args(spec: InferenceServiceSpec, model_dir: str, served_name: str) -> list[str]:
    r, s = spec.runtime, spec.server
    f = engine_flag  # engine settings' flags come from kubellm/settings.py: a renamed setting fails here
    args = [
        "serve",
        model_dir,
        "--host",
        "0.0.0.0",
        "--port",
        str(HTTP_PORT),
        "--served-model-name",
        served_name,
        f("dtype"),
        r.dtype,
        f("max_num_seqs"),
        str(r.max_num_seqs),
        f("max_num_batched_tokens"),
        str(r.max_num_batched_tokens),
        f("gpu_memory_utilization"),
        str(r.gpu_memory_utilization),
        f("scheduling_policy"),
        r.scheduling_policy,
        f("enable_prefix_caching") if r.enable_prefix_caching else "--no-" + f("enable_prefix_caching")[2:],
        "--drain-timeout-s",
        str(s.drain_seconds),
    ]
    if spec.resources.gpus == 0:
        args += [f("device"), "cpu"]
    elif spec.resources.gpus > 1:  # one replica spans its GPUs; more throughput is more replicas
        args += [f("tensor_parallel_size"), str(spec.resources.gpus)]
    if r.max_model_len:
        args += [f("max_model_len"), str(r.max_model_len)]
    if s.api_key_secret:
        args += ["--api-key-file", f"{API_KEYS_DIR}/keys"]
    if s.rate_limit_rpm:
        args += ["--rate-limit-rpm", str(s.rate_limit_rpm)]
    if s.rate_limit_burst:
        args += ["--rate-limit-burst", str(s.rate_limit_burst)]
    if s.max_queue_length is not None:
        args += ["--max-waiting-requests", str(s.max_queue_length)]
    if r.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", r.tool_call_parser]
    if r.reasoning_parser:
        args += ["--reasoning-parser", r.reasoning_parser]
    if r.quantization:
        args += [f("quantization"), r.quantization]
    if r.kv_cache_dtype != "auto":
        args += [f("kv_cache_dtype"), r.kv_cache_dtype]
    if r.speculative.enabled:
        args += [f("speculative_config"), json.dumps(r.speculative.model_dump(exclude={"enabled"}))]
    if slots := lora_slots(spec):  # adapters come and go through the pods' API (kubellm/operator/adapters.py)
        args += [f("enable_lora"), f("max_loras"), str(slots), f("max_lora_rank"), str(r.max_lora_rank)]
        args += ["--allow-runtime-lora-updating", "--admin-key-file", f"{ADMIN_KEY_DIR}/key"]
    return args + list(r.extra_args)


def _resources(spec: InferenceServiceSpec) -> dict:
    """The CR's requests and limits, defaults for the rest: a request only where no limit sets it (Kubernetes
    then uses the limit), a memory limit of at least the default and the memory request."""
    res = spec.resources
    requests = {k: v for k, v in (("cpu", res.requests.cpu), ("memory", res.requests.memory)) if v}
    limits = {k: v for k, v in (("cpu", res.limits.cpu), ("memory", res.limits.memory)) if v}
    for k, v in RUNTIME_DEFAULTS["requests"].items():
        if k not in requests and k not in limits:
            requests[k] = v
    if "memory" not in limits:  # the default, or the request where that is more
        default = RUNTIME_DEFAULTS["limits"]["memory"]
        asked = res.requests.memory
        limits["memory"] = asked if asked and quantity_value(asked) > quantity_value(default) else default
    if res.gpus:
        limits[res.gpu_resource_name] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def render_deployment(isvc: dict, spec: InferenceServiceSpec, held: str | None = None) -> dict:
    """`held`: why the replicas are held at 0 (operator/fit_plan.py's Hold, as its annotation), or None."""
    name = isvc["metadata"]["name"]
    served_name = spec.model.name or name
    model_dir, model_volume, init_container = model_location(spec.model, name)
    downloads = init_container is not None and init_container["name"] == FETCH_CONTAINER
    image = spec.runtime.image or DEFAULT_IMAGE
    drain = spec.server.drain_seconds
    container_security = CONTAINER_SECURITY
    env = [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    env += [{"name": e.name, "value": e.value} for e in spec.runtime.env]
    env += _tracing_env(name, {e.name for e in spec.runtime.env})
    mounts = [
        {"name": "model", "mountPath": MODEL_ROOT, "readOnly": not downloads},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if "emptyDir" in model_volume:
        model_volume = {**model_volume, "emptyDir": {"sizeLimit": spec.model.download_size_limit}}
    shm = f"{SHM_GIB_PER_GPU * max(1, spec.resources.gpus)}Gi"
    volumes = [
        model_volume,
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    adapter_volumes, adapter_mounts = _adapter_volumes(spec)
    volumes += adapter_volumes
    mounts += adapter_mounts
    if spec.server.api_key_secret:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": spec.server.api_key_secret}})
    if lora_slots(spec):
        mounts.append({"name": "admin-key", "mountPath": ADMIN_KEY_DIR, "readOnly": True})
        volumes.append({"name": "admin-key", "secret": {"secretName": admin_key_secret(name)}})
    container = {
        "name": RUNTIME_CONTAINER,
        "image": image,
        "command": ["kubellm"],
        "args": serve_args(spec, model_dir, served_name),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # a big model may take long to load: the startup probe holds the others off until /health answers
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": max(1, math.ceil(spec.startup.timeout_seconds / 10)),
        },
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": container_security,
    }
    pod_spec: dict = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + drain + 15,
        "securityContext": POD_SECURITY,
        "enableServiceLinks": False,
        # the server never calls the Kubernetes API: per-pod state is read by the operator, not written by pods
        "automountServiceAccountToken": False,
    }
    if init_container:
        init = {
            **init_container,
            "image": image,
            "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
            "volumeMounts": mounts[:2],
            "resources": INIT_RESOURCES,
            "securityContext": container_security,
        }
        if downloads:
            init["env"] = downloader_env(spec)
        pod_spec["initContainers"] = [init]
    if fetchers := _adapter_fetchers(spec, image):
        pod_spec["initContainers"] = pod_spec.get("initContainers", []) + fetchers
    sched = spec.scheduling
    pod_spec.update(_placement(sched))
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.runtime_class_name:
        pod_spec["runtimeClassName"] = sched.runtime_class_name
    strategy = {
        "InPlace": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "Surge": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "Recreate": {"type": "Recreate"},
    }[spec.rollout.strategy]
    deploy_spec: dict = {
        "selector": {"matchLabels": selector_for(name)},
        "strategy": strategy,
        "progressDeadlineSeconds": spec.startup.timeout_seconds + 600,
        "template": {
            "metadata": {
                "labels": {**labels_for(name), **ENGINE_TYPE_LABEL},
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(HTTP_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    metadata = _metadata(isvc)
    if held is not None:  # the model does not fit: no pod (an HPA does nothing while its target is at 0)
        deploy_spec["replicas"] = 0
        metadata["annotations"] = {HOLD_ANNOTATION: held}
    elif not spec.autoscaling.enabled:  # with autoscaling on, the HPA owns replicas: never fight it
        deploy_spec["replicas"] = spec.replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": deploy_spec}


def downloader_env(spec: InferenceServiceSpec) -> list[dict]:
    """A downloader's environment: online (the runtime image sets HF_HUB_OFFLINE=1 for `kubellm serve`), and
    model.credentialsSecret's named keys."""
    return [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HF_HUB_OFFLINE", "value": "0"}, *credential_env(spec)]


def credential_env(spec: InferenceServiceSpec) -> list[dict]:
    """model.credentialsSecret's named keys only: a Secret's other keys (LD_PRELOAD, …) stay out."""
    if not spec.model.credentials_secret:
        return []
    return [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": spec.model.credentials_secret, "key": key, "optional": True}},
        }
        for key in CREDENTIAL_KEYS
    ]


def render_service(isvc: dict) -> dict:
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(isvc),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_for(name),
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def render_hpa(isvc: dict, spec: InferenceServiceSpec) -> dict:
    a = spec.autoscaling
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(isvc),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            # an HPA cannot hold 0 (and does nothing while its target is at 0): the router takes 0 <-> 1
            "minReplicas": max(1, a.min_replicas),
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": _quantity(a.target_queue_depth)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": a.scale_up_stabilization_seconds},
                "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds},
            },
        },
    }


def render_inference_pool(isvc: dict, spec: InferenceServiceSpec) -> dict:
    """An InferencePool over this service's Ready pods, for a Gateway API endpoint picker: its scrapers read the
    vLLM-named metrics our pods export on the API port (the contract: tests/e2e/test_metrics_contract.py)."""
    name, ref = isvc["metadata"]["name"], spec.inference_pool.endpoint_picker_ref
    return {
        "apiVersion": INFERENCE_POOL_API,
        "kind": "InferencePool",
        "metadata": _metadata(isvc),
        "spec": {
            "selector": {"matchLabels": selector_for(name)},
            "targetPorts": [{"number": HTTP_PORT}],
            "endpointPickerRef": {
                "name": ref.name,
                "kind": "Service",
                "port": {"number": ref.port},
                "failureMode": ref.failure_mode,
            },
        },
    }


def render_pdb(isvc: dict) -> dict:
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(isvc),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_for(name)}},
    }


def _tracing_env(name: str, given: set[str]) -> list[dict]:
    """With the operator's OTLP endpoint set: the standard OpenTelemetry variables, the service named after the
    InferenceService; runtime.env's own values of them win."""
    if OTLP_TRACES_ENDPOINT is None:
        return []
    env = {tracing.TRACES_ENDPOINT_ENV: OTLP_TRACES_ENDPOINT, "OTEL_SERVICE_NAME": name}
    return [{"name": k, "value": v} for k, v in env.items() if k not in given]


def _otlp_egress() -> list[dict]:
    if OTLP_TRACES_ENDPOINT is None:
        return []
    url = urlsplit(OTLP_TRACES_ENDPOINT)
    return [{"ports": [{"protocol": "TCP", "port": url.port or (443 if url.scheme == "https" else 80)}]}]


def render_network_policy(isvc: dict, spec: InferenceServiceSpec) -> dict:
    """Ingress to the API port from this namespace's pods, the operator's (it reads the pods' /metrics for the
    custom metrics API), kubellm router's beside it, and networkPolicy.ingressFrom; egress to DNS, to TCP 443
    when the weights are downloaded at start-up, to the operator's OTLP endpoint's port, and networkPolicy.egress.
    Probes come from the kubelet, which NetworkPolicies do not filter."""
    name, np = isvc["metadata"]["name"], spec.network_policy
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    egress = [{"ports": dns}]
    downloads = not spec.model.uri.startswith("pvc://") and not spec.model.cache.enabled  # the cache's Job downloads
    if downloads or downloaded_adapters(spec):
        egress.append({"ports": [{"protocol": "TCP", "port": 443}]})
    egress += _otlp_egress()  # spans to the operator's OTLP endpoint
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
        "podSelector": {"matchLabels": OPERATOR_POD_LABELS},
    }
    router = {  # kubellm router, installed by the chart beside the operator
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
        "podSelector": {"matchLabels": ROUTER_POD_LABELS},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(isvc),
        "spec": {
            "podSelector": {"matchLabels": selector_for(name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {}}, operator, router, *np.ingress_from],
                    "ports": [{"protocol": "TCP", "port": HTTP_PORT}],
                }
            ],
            "egress": egress + list(np.egress),
        },
    }


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 1e-3, "": 1}
_SUFFIX |= {s: 1000.0 ** (i + 1) for i, s in enumerate("kMGTPE")}


def quantity_value(q: str) -> float:
    """A Kubernetes quantity's value ("16Gi" → 17179869184.0); 0 for what does not parse (the API rejects it)."""
    m = re.fullmatch(r"\+?([0-9]*\.?[0-9]+)(?:[eE]([-+]?[0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?", q.strip())
    if not m:
        return 0.0
    return float(m.group(1)) * 10 ** int(m.group(2) or 0) * _SUFFIX[m.group(3) or ""]


def _quantity(x: float) -> str:
    """A Kubernetes quantity string for a float (5 → "5", 2.5 → "2500m")."""
    return str(int(x)) if float(x).is_integer() else f"{int(round(x * 1000))}m"


def render_cache_claim(isvc: dict, spec: InferenceServiceSpec) -> dict:
    """The model cache's PersistentVolumeClaim. With reclaim Retain it has no owner reference (the garbage
    collector leaves it); the ISVC label says whose it is, and an InferenceService of that name takes it up."""
    cache = spec.model.cache
    meta = _metadata(isvc, CACHE_LABELS)
    if cache.reclaim == "Retain":
        meta.pop("ownerReferences")
    claim_spec: dict = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name is not None:
        claim_spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": claim_spec}


def render_cache_job(isvc: dict, spec: InferenceServiceSpec) -> dict:
    """The Job that downloads the model once into the cache claim (`kubellm fetch-model`: progress lines in its
    log, a completion marker last, then the model's config in its termination message; a complete copy of the
    same URI is not downloaded again). Kept after it completes: it is the record the status and the fit check
    read, and the replicas' init containers wait for its marker."""
    name, uri = isvc["metadata"]["name"], spec.model.uri
    model_dir = f"{MODEL_ROOT}/{cache_subdir(uri)}"
    container = {
        "name": FETCH_CONTAINER,
        "image": spec.runtime.image or DEFAULT_IMAGE,
        "command": ["kubellm", "fetch-model", uri, model_dir, "--progress-interval", "2"]
        + ["--termination-message", CACHE_TERMINATION_MESSAGE],
        "env": downloader_env(spec),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_ROOT}, {"name": "tmp", "mountPath": "/tmp"}],
        "resources": INIT_RESOURCES,
        "securityContext": CONTAINER_SECURITY,
    }
    pod_spec: dict = {
        "restartPolicy": "OnFailure",  # one pod: its log is the progress, its restarts resume (kept files)
        "containers": [container],
        "volumes": [
            {"name": "model", "persistentVolumeClaim": {"claimName": name}},
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        ],
        "securityContext": POD_SECURITY,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    pod_spec.update(_placement(spec.scheduling))  # a ReadWriteOnce claim: the Job runs where the replicas can mount it
    meta = _metadata(isvc, CACHE_LABELS)
    meta["annotations"] = {CACHE_URI_ANNOTATION: uri}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": CACHE_JOB_BACKOFF_LIMIT,
            "template": {"metadata": {"labels": {**labels_for(name), **CACHE_LABELS}}, "spec": pod_spec},
        },
    }


def render(isvc: dict, held: str | None = None) -> list[dict]:
    """All children the InferenceService should have right now (absent kinds are to be deleted); `held`: the
    Deployment's replicas are held at 0, and this says why (render_deployment)."""
    spec = parse_spec(isvc.get("spec") or {})
    children = [render_deployment(isvc, spec, held), render_service(isvc)]
    if spec.autoscaling.enabled:
        children.append(render_hpa(isvc, spec))
    replicas = spec.autoscaling.min_replicas if spec.autoscaling.enabled else spec.replicas
    if replicas > 1:
        children.append(render_pdb(isvc))
    if spec.network_policy.enabled:
        children.append(render_network_policy(isvc, spec))
    if spec.inference_pool.enabled:
        children.append(render_inference_pool(isvc, spec))
    if spec.model.cache.enabled and not spec.model.uri.startswith("pvc://"):
        children += [render_cache_claim(isvc, spec), render_cache_job(isvc, spec)]
    return children
