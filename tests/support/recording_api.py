"""An in-memory stand-in for the API clients the operator's Reconciler uses (dynamic, custom objects, core):
it keeps objects by (kind, namespace, name) and records every (kind, verb) asked of it, so unit tests can
check what the Reconciler does and which RBAC verbs that needs."""

from __future__ import annotations

import base64
from types import SimpleNamespace

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubellm.operator.reconcile import POLICY_CONFIGMAP, Reconciler


class _Obj(dict):
    def to_dict(self):
        return dict(self)


class RecordingApi:
    """Just enough of the dynamic, custom-objects and core clients for Reconciler; records (kind, verb)."""

    def __init__(self):
        self.store: dict[tuple, dict] = {}
        self.calls: set[tuple[str, str]] = set()
        self.reject_next_apply = False
        self.isvc: dict = {}
        self.policy_data: dict | None = None  # the policy ConfigMap's data; None: no ConfigMap
        self.pod_logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> log text
        self.nodes: list[client.V1Node] = []
        self.pods: list[dict] = []  # plain pod dicts, listed by namespace and an "a=b,c=d" label selector
        self.api_client = client.ApiClient()  # CoreV1Api's: turns the nodes into plain dicts

    def resource(self, kind):
        api = self

        class Resource:
            def get(self, name, namespace):
                api.calls.add((kind, "get"))
                if (kind, namespace, name) not in api.store:
                    raise ApiException(status=404)
                return _Obj(api.store[(kind, namespace, name)])

            def create(self, body, namespace, field_manager):
                api.calls.add((kind, "create"))
                key = (kind, namespace, body["metadata"]["name"])
                if key in api.store:
                    raise ApiException(status=409)
                managed = [{"manager": field_manager, "operation": "Update"}]
                api.store[key] = {
                    **body,
                    "metadata": {**body["metadata"], "uid": f"uid-{kind}", "managedFields": managed},
                }
                return _Obj(api.store[key])

            def patch(self, body, name, namespace, content_type, field_manager):
                api.calls.add((kind, "patch"))
                assert content_type == "application/json-patch+json"
                entries = api.store[(kind, namespace, name)]["metadata"]["managedFields"]
                for op in body:
                    i, field = op["path"].split("/")[3:]
                    if op["op"] == "test" and entries[int(i)][field] != op["value"]:
                        raise ApiException(status=422)
                    if op["op"] == "replace":
                        entries[int(i)][field] = op["value"]

            def server_side_apply(self, body, name, namespace, field_manager, force_conflicts):
                api.calls.add((kind, "patch"))
                live = api.store.get((kind, namespace, name))
                if api.reject_next_apply:
                    api.reject_next_apply = False
                    raise ApiException(status=422)
                if live is None or body["metadata"].get("uid") != live["metadata"]["uid"]:
                    raise ApiException(status=409)  # the operator applies only to what it read, uid and all
                api.store[(kind, namespace, name)] = body
                return _Obj(body)

            def replace(self, body, namespace):
                api.calls.add((kind, "update"))
                api.store[(kind, namespace, body["metadata"]["name"])] = body

            def delete(self, name, namespace, body):
                api.calls.add((kind, "delete"))
                api.store.pop((kind, namespace, name), None)

        return Resource()

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.add(("InferenceService", "get"))
        return self.isvc

    def read_namespaced_pod_log(self, name, namespace, container, tail_lines):
        self.calls.add(("PodLog", "get"))
        return self.pod_logs.get((namespace, name, container), "")

    def read_namespaced_config_map(self, name, namespace):
        self.calls.add(("ConfigMap", "get"))
        assert f"{namespace}/{name}" == POLICY_CONFIGMAP
        if self.policy_data is None:
            raise ApiException(status=404)
        return client.V1ConfigMap(data=self.policy_data)

    def read_namespaced_secret(self, name, namespace):
        self.calls.add(("Secret", "get"))
        if ("Secret", namespace, name) not in self.store:
            raise ApiException(status=404)
        return self.store[("Secret", namespace, name)]

    def create_namespaced_secret(self, namespace, body):
        self.calls.add(("Secret", "create"))
        key = ("Secret", namespace, body["metadata"]["name"])
        if key in self.store:
            raise ApiException(status=409)
        data = {k: base64.b64encode(v.encode()).decode() for k, v in body.get("stringData", {}).items()}
        meta = {**body["metadata"], "uid": "uid-Secret"}
        self.store[key] = {**{k: v for k, v in body.items() if k != "stringData"}, "metadata": meta, "data": data}

    def delete_namespaced_secret(self, name, namespace, body):
        self.calls.add(("Secret", "delete"))
        self.store.pop(("Secret", namespace, name), None)

    def list_namespaced_pod(self, namespace, label_selector=""):
        self.calls.add(("Pod", "list"))
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        items = [
            p
            for p in self.pods
            if p["metadata"].get("namespace") == namespace
            and all(p["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        return SimpleNamespace(items=items)  # what the Reconciler reads of a V1PodList

    def list_node(self):
        self.calls.add(("Node", "list"))
        return client.V1NodeList(items=self.nodes)


def recording_reconciler() -> tuple[Reconciler, RecordingApi]:
    api = RecordingApi()
    r = Reconciler.__new__(Reconciler)
    r._resource, r.custom, r.core, r.policy_configmap = api.resource, api, api, POLICY_CONFIGMAP
    r._resources, r._missing = {}, {}
    return r, api
