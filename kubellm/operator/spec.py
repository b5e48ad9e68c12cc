"""The InferenceService API (kubellm.io/v1alpha1): pydantic models that are the single source of truth for
the CRD's schema, defaults and CEL validation rules (crd.py turns them into crds/*.yaml)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubellm.operator.serve_flags import OWNED_ENV, allowed_extra_flags, env_rule, extra_args_rule
from kubellm.settings import (
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    REASONING_PARSERS,
    SPECULATIVE_METHODS,
    TOOL_CALL_PARSERS,
)

GROUP, VERSION, KIND, PLURAL = "kubellm.io", "v1alpha1", "InferenceService", "inferenceservices"
SHORT_NAMES = ["kisvc", "kllm"]  # KServe owns isvc and llmisvc


QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


def rules(*pairs: tuple[str, str]) -> dict:
    """CEL validation rules for a schema node: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in pairs]}


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ModelCache(Spec):
    """A PersistentVolumeClaim the model is downloaded into once, by a Job, and that every replica mounts read-only
    (KubeAI's cacheProfiles shape: one shared volume per model; KServe's LocalModelCache copies per node)."""

    enabled: bool = Field(
        False,
        description="Download the model once into a PersistentVolumeClaim (named after this InferenceService) "
        "with a Job; replicas wait for it and start without downloading",
    )
    size: str = Field("100Gi", pattern=QUANTITY, description="The claim's storage request")
    storage_class_name: str | None = Field(
        None,
        max_length=253,
        description="The claim's StorageClass; unset: the cluster's default; \"\": none (a PersistentVolume made "
        "beforehand for this claim)",
    )
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        "ReadWriteMany",
        description="ReadWriteMany lets replicas on every node share the copy; ReadWriteOnce keeps the Job and the "
        "replicas on the node that mounts it",
    )
    reclaim: Literal["Delete", "Retain"] = Field(
        "Delete",
        description="Delete: the claim goes with the InferenceService (owner reference); Retain: it stays, and an "
        "InferenceService of the same name takes it up again without downloading",
    )


class ModelSource(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.uri.matches('^(hf://[^/@]+/[^/@]+(@.+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://[^/]+(/.*)?)$')",
                "model.uri must be hf://org/name[@revision], pvc://claim[/path] or s3://bucket[/prefix]",
            ),
            (
                "!has(self.cache) || !self.cache.enabled || !self.uri.startsWith('pvc://')",
                "model.cache is for hf:// and s3:// models: a pvc:// model is already on a volume",
            ),
        )
    )
    uri: str = Field(
        max_length=2048,
        description="Where the weights are: hf://org/name[@revision], pvc://claim/path, s3://bucket/prefix",
    )
    name: str | None = Field(
        None, description="Served model id (the `model` field clients send); default metadata.name"
    )
    credentials_secret: str | None = Field(
        None,
        description="Secret whose keys HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
        "AWS_REGION, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (those present) reach the downloader, no others",
    )
    download_size_limit: str = Field(
        "200Gi",
        pattern=QUANTITY,
        description="sizeLimit of the emptyDir the weights are downloaded into (hf://, s3://): the kubelet evicts "
        "a pod that writes more",
    )
    cache: ModelCache = Field(default_factory=ModelCache)
    config: dict[str, Any] | None = Field(
        None,
        description="The model's config.json (as an object; at least hidden_size, num_hidden_layers, "
        "num_attention_heads, vocab_size, intermediate_size): with it the operator checks before any pod starts "
        "that the model fits one GPU's memory (resources.gpuMemory or the nodes' nvidia.com/gpu.memory label) and "
        "holds the replicas at 0 with reason InsufficientGPUMemory otherwise. Without it, a model.cache Job reports "
        "the config when it completes (the replicas wait at 0 for it; this field, when given, wins); else the "
        "runtime checks at start",
    )


ADAPTER_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$"


class AdapterSource(Spec):
    """A LoRA adapter (PEFT format: adapter_config.json + safetensors) served beside the model under its own name."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.uri.matches('^(hf://[^/@]+/[^/@]+(@.+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+|s3://[^/]+(/.*)?)$')",
                "adapters[].uri must be pvc://claim/path, hf://org/name[@revision] or s3://bucket[/prefix]",
            ),
        )
    )
    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=ADAPTER_NAME,
        description="The `model` a request sends to use this adapter (listed by /v1/models with the model as parent)",
    )
    uri: str = Field(
        max_length=2048,
        description="pvc://claim/path: the adapter's directory, its claim mounted read-only (the model's own claim "
        "is mounted once for both); hf://org/name[@revision] or s3://bucket/prefix: downloaded at pod start by an "
        "init container with model.credentialsSecret. A new claim or a downloaded adapter changes the pod template, "
        "so the pods roll; pvc:// adapters come and go without a restart",
    )


class EnvVar(Spec):
    name: str = Field(min_length=1, max_length=256)
    value: str = Field("", max_length=32768)


class SpeculativeSpec(Spec):
    """vLLM's --speculative-config, typed: drafts looked up in the sequence itself (no draft model)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.promptLookupMin <= self.promptLookupMax",
                "runtime.speculative.promptLookupMin must not exceed promptLookupMax",
            )
        )
    )
    enabled: bool = False
    method: Literal[SPECULATIVE_METHODS] = "ngram"  # type: ignore[valid-type]
    num_speculative_tokens: int = Field(4, ge=1, le=64, description="Draft tokens verified per step at most")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="Longest n-gram looked up")
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="Shortest n-gram looked up")


class RuntimeSpec(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.gpuMemoryUtilization > 0.0 && self.gpuMemoryUtilization <= 1.0",
                "runtime.gpuMemoryUtilization must be in (0, 1]",
            ),
            ("!has(self.maxModelLen) || self.maxModelLen >= 16", "runtime.maxModelLen must be at least 16"),
        )
    )
    image: str | None = Field(None, description="Runtime image; default from the operator's configuration")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    tool_call_parser: Literal[TOOL_CALL_PARSERS] | None = Field(  # type: ignore[valid-type]
        None,
        description="The model's tool-call format (vLLM's names); enables tool_choice \"auto\" "
        "(--enable-auto-tool-choice --tool-call-parser)",
    )
    reasoning_parser: Literal[REASONING_PARSERS] | None = Field(  # type: ignore[valid-type]
        None, description="Split the model's thinking block into reasoning_content (--reasoning-parser)"
    )
    quantization: Literal[QUANTIZATION_METHODS] | None = Field(  # type: ignore[valid-type]
        None,
        description="Quantize the weights at load (--quantization); FP8 checkpoints are recognised from their config",
    )
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(  # type: ignore[valid-type]
        "auto",
        description="The KV cache's element type (--kv-cache-dtype): auto (the model's dtype) or FP8 (fp8 = "
        "fp8_e4m3, fp8_e5m2): one byte a value, twice the cached tokens in the same memory; scales from the "
        "checkpoint, else 1.0",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        le=64,
        description="LoRA slots per replica (--max-loras); default: spec.adapters' count rounded up to a multiple "
        "of 4. Set, it keeps LoRA on while spec.adapters is empty (adding the first adapter then needs no restart)",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="The largest adapter rank (--max-lora-rank)")
    speculative: SpeculativeSpec = Field(
        default_factory=SpeculativeSpec,
        description="Speculative decoding by n-gram lookup (--speculative-config) when enabled; greedy output is "
        "unchanged, sampled output keeps its distribution (rejection sampling)",
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        max_length=64,
        description="More `kubellm serve` flags, spelled in full (checked by the operator with the serve parser)",
        json_schema_extra=rules(
            (
                extra_args_rule(),
                "runtime.extraArgs must not set --host, --port or --tensor-parallel-size (the model is split across "
                "resources.gpus), nor any other setting the operator owns, nor abbreviate a flag: allowed flags are "
                + ", ".join(allowed_extra_flags()),
            )
        ),
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=128,
        json_schema_extra=rules(
            (
                env_rule(),
                "runtime.env must not set KUBELLM_* (settings go through the InferenceService's fields or "
                f"runtime.extraArgs) nor {', '.join(sorted(OWNED_ENV))}",
            )
        ),
    )


class ComputeResources(Spec):
    cpu: str | None = None
    memory: str | None = None


class Resources(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.gpus >= 0", "resources.gpus must not be negative"),
            ("self.gpus <= 64", "resources.gpus must be at most 64"),
        )
    )
    gpus: int = Field(
        1,
        description="GPUs per replica (0 runs on CPU); with more than one, the model is split "
        "across them (tensor parallelism: they must divide its attention heads)",
    )
    gpu_resource_name: str = "nvidia.com/gpu"
    gpu_memory: str | None = Field(
        None,
        pattern=QUANTITY,
        description="Memory of one GPU (e.g. 80Gi) for the operator's fit check; default: the nvidia.com/gpu.memory "
        "label (GPU feature discovery, MiB) of the nodes a replica may run on",
    )
    requests: ComputeResources = Field(default_factory=ComputeResources)
    limits: ComputeResources = Field(default_factory=ComputeResources)


class Scheduling(Spec):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


class Autoscaling(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
            ("self.minReplicas >= 0", "autoscaling.minReplicas must not be negative"),
            ("self.maxReplicas >= 1", "autoscaling.maxReplicas must be at least 1"),
            ("self.targetQueueDepth > 0.0", "autoscaling.targetQueueDepth must be positive"),
        )
    )
    enabled: bool = True
    min_replicas: int = Field(
        1,
        description="0: scale to zero after idleSeconds without a request (through `kubellm router`, which holds "
        "the next request while it scales the Deployment back to 1; the HPA keeps 1..maxReplicas)",
    )
    max_replicas: int = 4
    idle_seconds: int = Field(
        300, ge=30, le=86400, description="With minReplicas 0: requestless time before the router scales to zero"
    )
    target_queue_depth: float = Field(5.0, description="Average waiting requests per pod that the HPA aims for")
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)


class Server(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.drainSeconds >= 0 && self.drainSeconds <= 3600", "server.drainSeconds must be in [0, 3600]"),
        )
    )
    api_key_secret: str | None = Field(None, description="Secret whose key `keys` holds API keys, one per line")
    rate_limit_rpm: float | None = Field(None, gt=0)
    rate_limit_burst: int | None = Field(None, ge=1)
    max_queue_length: int | None = Field(None, ge=0, description="Waiting requests beyond this get 429")
    drain_seconds: int = 30


class Startup(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.timeoutSeconds >= 30", "startup.timeoutSeconds must be at least 30"),
        )
    )
    timeout_seconds: int = Field(1800, description="Time a replica may take to load the model before it is restarted")


class Rollout(Spec):
    strategy: Literal["InPlace", "Surge", "Recreate"] = Field(
        "InPlace",
        description="InPlace: replace one pod at a time, no spare GPU needed (never deadlocks); "
        "Surge: start the new pod first (needs a spare GPU set); Recreate: all at once",
    )


class NetworkPolicySpec(Spec):
    enabled: bool = Field(
        False,
        description="Render a NetworkPolicy: the API port open to this namespace's pods (and ingressFrom), egress "
        "only to DNS and, for a model downloaded at start-up, to TCP 443",
    )
    ingress_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="More NetworkPolicyPeers allowed to reach the API port (e.g. the gateway's or Prometheus' "
        "namespace)",
    )
    egress: list[dict[str, Any]] = Field(
        default_factory=list, description="More NetworkPolicyEgressRules (e.g. an S3 endpoint on another port)"
    )


class EndpointPickerRef(Spec):
    name: str | None = Field(
        None, min_length=1, max_length=253, description="The endpoint picker's Service (same namespace)"
    )
    port: int = Field(9002, ge=1, le=65535, description="Its gRPC ext-proc port (the Service port)")
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose"


class InferencePoolSpec(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "!self.enabled || has(self.endpointPickerRef.name)",
                "inferencePool.endpointPickerRef.name (the endpoint picker's Service) is required when enabled",
            ),
        )
    )
    enabled: bool = Field(
        False,
        description="Render an InferencePool (inference.networking.k8s.io/v1) over this service's pods for a Gateway "
        "API endpoint picker (llm-d router, GIE EPP) instead of kubellm router; needs the Gateway API Inference "
        "Extension CRDs",
    )
    endpoint_picker_ref: EndpointPickerRef = Field(default_factory=EndpointPickerRef)


class InferenceServiceSpec(Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.replicas >= 0", "replicas must not be negative"),
            (
                "!has(self.model.name) || self.adapters.all(a, a.name != self.model.name)",
                "adapters[].name must differ from model.name",
            ),
            (
                "!has(self.runtime.maxLoras) || size(self.adapters) <= self.runtime.maxLoras",
                "adapters must not outnumber runtime.maxLoras",
            ),
        )
    )
    model: ModelSource
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    replicas: int = Field(1, description="Used when autoscaling is off; the target of `kubectl scale`")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    server: Server = Field(default_factory=Server)
    startup: Startup = Field(default_factory=Startup)
    rollout: Rollout = Field(default_factory=Rollout)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    inference_pool: InferencePoolSpec = Field(default_factory=InferencePoolSpec)
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters the operator loads onto every Ready replica (and unloads when removed) through "
        "the runtime's /v1/load_lora_adapter; no restart for a change, except a new claim or more slots",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},  # unique names
    )


def parse_spec(spec: dict) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(spec)
