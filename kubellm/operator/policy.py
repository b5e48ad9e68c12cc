"""What an InferenceService may ask for: `kubellm serve` flags and environment variables the operator owns
stay the operator's, and a cluster admin's allow-list (a ConfigMap, shared with the admission policy in
manifests/policy.yaml) bounds images, priority classes, runtime classes, tolerations, node selectors and
device resources. Pure (no I/O): a refusal is a `Refused(reason, message)` that becomes a status condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.operator.serve_flags import (
    OWNED_ENV,
    OWNED_ENV_PREFIX,
    OWNED_SETTINGS,
    ServeArgsError,
    parse_serve_args,
    serve_flags,
)
from kubellm.operator.spec import InferenceServiceSpec


class Refused(Exception):
    """The operator will not act on this InferenceService as written; `reason` is a condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def check_extra_args(extra: list[str]) -> None:
    """Parse runtime.extraArgs exactly as `kubellm serve` would (abbreviations off); refuse unknown flags,
    bad values and any operator-owned setting."""
    if not extra:
        return
    try:
        parsed = parse_serve_args(list(extra))
    except ServeArgsError as e:
        raise Refused(
            "InvalidRuntimeArgs", f"runtime.extraArgs {extra!r} do not parse as `kubellm serve` flags: {e}"
        ) from None
    baseline = parse_serve_args([])
    owned = sorted(d for d in OWNED_SETTINGS if d in parsed and parsed[d] != baseline[d])
    if owned:
        flags = {dest: flag for flag, dest in sorted(serve_flags().items(), reverse=True)}
        raise Refused(
            "InvalidRuntimeArgs",
            f"runtime.extraArgs set {', '.join(flags.get(d, d) for d in owned)}: the operator owns these "
            "settings (use the InferenceService's own fields)",
        )


def check_env(spec: InferenceServiceSpec) -> None:
    bad = [e.name for e in spec.runtime.env if e.name.upper().startswith(OWNED_ENV_PREFIX) or e.name in OWNED_ENV]
    if bad:
        raise Refused(
            "ForbiddenEnv",
            f"runtime.env must not set {', '.join(bad)}: KUBELLM_* settings go through the InferenceService's "
            f"fields or runtime.extraArgs, and {', '.join(sorted(OWNED_ENV))} are the operator's",
        )


@dataclass(frozen=True)
class Policy:
    """A cluster admin's allow-list; None for a key means that field is not restricted."""

    image_prefixes: tuple[str, ...] | None = None
    priority_classes: tuple[str, ...] | None = None
    runtime_classes: tuple[str, ...] | None = None
    toleration_keys: tuple[str, ...] | None = None
    node_selector_keys: tuple[str, ...] | None = None
    gpu_resource_names: tuple[str, ...] | None = None
    source: str = field(default="", compare=False)


POLICY_KEYS = {  # ConfigMap key → Policy field; values are comma-separated lists
    "allowedImagePrefixes": "image_prefixes",
    "allowedPriorityClasses": "priority_classes",
    "allowedRuntimeClasses": "runtime_classes",
    "allowedTolerationKeys": "toleration_keys",
    "allowedNodeSelectorKeys": "node_selector_keys",
    "allowedGpuResourceNames": "gpu_resource_names",
}


def policy_from_configmap(data: dict[str, str] | None, source: str = "") -> Policy:
    values = {
        attr: tuple(x.strip() for x in (data or {})[key].split(",") if x.strip())
        for key, attr in POLICY_KEYS.items()
        if key in (data or {})
    }
    return Policy(**values, source=source)


def node_affinity_keys(affinity: dict | None) -> list:
    """The node label and field keys a (free-form) affinity selects on, required and preferred terms alike."""
    node = (affinity or {}).get("nodeAffinity") or {}
    required = (node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    preferred = [p.get("preference") or {} for p in node.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    return [
        e.get("key")
        for t in required + preferred
        for e in (t.get("matchExpressions") or []) + (t.get("matchFields") or [])
    ]


def check_policy(spec: InferenceServiceSpec, policy: Policy) -> None:
    """Refuse what the allow-list does not allow; every violation is named."""
    s, problems = spec.scheduling, []

    def check(what: str, value, allowed: tuple[str, ...] | None, key: str) -> None:
        if allowed is not None and value not in allowed:
            problems.append(f"{what} {value!r} is not in {key} {list(allowed)}")

    image = spec.runtime.image  # unset: the operator's own default image, which the admin installed
    if image and policy.image_prefixes is not None and not image.startswith(policy.image_prefixes):
        problems.append(
            f"runtime.image {image!r} starts with none of allowedImagePrefixes {list(policy.image_prefixes)}"
        )
    if s.priority_class_name:
        check("scheduling.priorityClassName", s.priority_class_name, policy.priority_classes, "allowedPriorityClasses")
    if s.runtime_class_name:
        check("scheduling.runtimeClassName", s.runtime_class_name, policy.runtime_classes, "allowedRuntimeClasses")
    for t in s.tolerations:
        check("a toleration of key", t.get("key"), policy.toleration_keys, "allowedTolerationKeys")
    for key in s.node_selector:
        check("scheduling.nodeSelector key", key, policy.node_selector_keys, "allowedNodeSelectorKeys")
    for key in node_affinity_keys(s.affinity):
        check("scheduling.affinity node key", key, policy.node_selector_keys, "allowedNodeSelectorKeys")
    if spec.resources.gpus:
        check(
            "resources.gpuResourceName",
            spec.resources.gpu_resource_name,
            policy.gpu_resource_names,
            "allowedGpuResourceNames",
        )
    if problems:
        where = f" ({policy.source})" if policy.source else ""
        raise Refused("PolicyViolation", f"the cluster policy{where} does not allow: " + "; ".join(problems))


def admit(spec: InferenceServiceSpec, policy: Policy) -> None:
    """Everything the operator checks before it renders a pod from this spec."""
    check_extra_args(spec.runtime.extra_args)
    check_env(spec)
    check_policy(spec, policy)
