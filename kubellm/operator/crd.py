"""Generate the InferenceService CRD (structural OpenAPI schema, defaults, CEL rules, printer columns,
status and scale subresources) from the pydantic models in spec.py. `kubellm crd` prints it."""

from __future__ import annotations

import yaml

from kubellm.operator.spec import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION, InferenceServiceSpec

_COPY = (
    "type",
    "description",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "x-kubernetes-validations",
    "format",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
)


def _structural(node: dict, defs: dict) -> dict:
    """pydantic's JSON schema (draft 2020-12) → a Kubernetes structural schema (OpenAPI v3.0 subset)."""
    if "$ref" in node:
        target = _structural(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {**target, **{k: v for k, v in node.items() if k in ("description", "default")}}
    if "anyOf" in node:  # Optional[X]: absent (never null) when unset, so CEL's has() works
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        out = _structural(options[0], defs)
        if "description" in node:
            out["description"] = node["description"]
        if node.get("default") is not None:
            out["default"] = node["default"]
        return out
    out = {k: node[k] for k in _COPY if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out.update(minimum=node["exclusiveMinimum"], exclusiveMinimum=True)
    if node.get("default") is not None:
        out["default"] = node["default"]
    kind = node.get("type")
    if kind == "object":
        if "properties" in node:
            out["properties"] = {name: _property(name, sub, node, defs) for name, sub in node["properties"].items()}
            if node.get("required"):
                out["required"] = node["required"]
        elif isinstance(node.get("additionalProperties"), dict) and node["additionalProperties"].get("type"):
            out["additionalProperties"] = _structural(node["additionalProperties"], defs)
        else:  # free-form (affinity, tolerations): kept as the user wrote it
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _structural(node.get("items", {}), defs)
    return out


def _property(name: str, sub: dict, parent: dict, defs: dict) -> dict:
    s = _structural(sub, defs)
    if name not in parent.get("required", []) and "default" not in s:
        if s.get("type") == "object" and "properties" in s:
            s["default"] = _defaults(s)  # the nested defaults, so rules see a complete object
        elif s.get("type") == "array":
            s["default"] = []
    return s


def _defaults(schema: dict) -> dict:
    return {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}


def spec_schema() -> dict:
    raw = InferenceServiceSpec.model_json_schema(by_alias=True)
    return _structural(raw, raw.get("$defs", {}))


STATUS_SCHEMA = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "observedGeneration": {"type": "integer"},
        "replicas": {"type": "integer"},
        "readyReplicas": {"type": "integer"},
        "scaledToZero": {"type": "boolean"},
        "url": {"type": "string"},
        "selector": {"type": "string"},
        "modelName": {"type": "string"},
        "replicaAdapters": {
            "type": "array",
            "description": "Each Ready replica and the LoRA adapters it holds",
            "items": {
                "type": "object",
                "properties": {"pod": {"type": "string"}, "adapters": {"type": "array", "items": {"type": "string"}}},
            },
        },
        "progress": {"type": "string", "description": "Start-up in one line: the model cache, replicas by phase"},
        "replicaStatuses": {
            "type": "array",
            "description": "Each replica's phase: WaitingForCache, Downloading, LoadingWeights, "
            "WarmingUp (Loading until the runtime says which), Ready, or what is wrong",
            "items": {
                "type": "object",
                "properties": {
                    "pod": {"type": "string"},
                    "phase": {"type": "string"},
                    "progress": {"type": "string"},
                    "message": {"type": "string"},
                },
            },
        },
        "cache": {
            "type": "object",
            "description": "The model cache (model.cache): Pending, Downloading, Ready or Failed",
            "properties": {
                "phase": {"type": "string"},
                "message": {"type": "string"},
                "progress": {"type": "string"},
                "percent": {"type": "number"},
            },
        },
        "modelConfig": {
            "type": "object",
            "description": "Where the fit check's model config comes from: spec.model.config, or modelCache (the "
            "cache Job's pod reported the model's config.json when it completed)",
            "properties": {"source": {"type": "string"}, "pod": {"type": "string"}, "message": {"type": "string"}},
        },
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                    "observedGeneration": {"type": "integer"},
                },
            },
        },
    },
}


def build_crd() -> dict:
    ready = '.status.conditions[?(@.type=="Ready")]'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["kubellm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".status.modelName"},
                        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "ScaledToZero", "type": "boolean", "jsonPath": ".status.scaledToZero"},
                        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 0},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from kubellm/operator/spec.py by `kubellm crd`; do not edit (a test fails on drift).\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
