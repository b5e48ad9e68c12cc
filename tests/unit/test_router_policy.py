"""The router's pure parts: prefix affinity with bounded loads, saturation, the prompt prefix, the route of an
InferenceService, and the load read from a pod's /metrics."""

from __future__ import annotations

import collections

from kubellm.router.discovery import isvc_route
from kubellm.router.policy import LeastLoad, Limits, PodLoad, PrefixAffinity, deletion_cost, prompt_prefix
from kubellm.router.scrape import parse_finished, parse_load

PODS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]
PREFIXES = [f"conversation {i}: you are a helpful assistant" for i in range(400)]


def idle(pods=PODS) -> dict[str, PodLoad]:
    return {p: PodLoad() for p in pods}


def test_the_same_prefix_goes_to_the_same_pod_and_prefixes_spread_over_all_pods():
    policy = PrefixAffinity()
    first = {pre: policy.choose(pre, idle()).order[0] for pre in PREFIXES}
    assert all(policy.choose(pre, idle()).order[0] == pod for pre, pod in first.items())
    share = collections.Counter(first.values())
    assert set(share) == set(PODS)
    assert max(share.values()) < 2 * len(PREFIXES) / len(PODS)  # 100 virtual nodes per pod even the ring out
    assert all(policy.choose(pre, idle()).affinity for pre in PREFIXES)


def test_a_new_pod_takes_prefixes_only_from_others_never_reshuffles_the_rest():
    policy = PrefixAffinity()
    before = {pre: policy.choose(pre, idle()).order[0] for pre in PREFIXES}
    new = "http://10.0.0.9:8000"
    after = {pre: policy.choose(pre, idle(PODS + [new])).order[0] for pre in PREFIXES}
    moved = [pre for pre in PREFIXES if before[pre] != after[pre]]
    assert moved and all(after[pre] == new for pre in moved)
    assert len(moved) < len(PREFIXES) / 2


def test_a_loaded_pod_spills_its_prefixes_to_the_next_pod_on_the_ring():
    policy = PrefixAffinity(load_factor=1.25)
    prefix = PREFIXES[0]
    walk = policy.walk(prefix, tuple(sorted(PODS)))
    loads = idle()
    loads[walk[0]] = PodLoad(in_flight=6)  # bound max(4, ceil(1.25 * (6 + 1) / 4)) = 4 < 6 + 1
    choice = policy.choose(prefix, loads)
    assert choice.order[0] == walk[1] and not choice.affinity
    assert choice.order[-1] == walk[0]  # still a retry target: loaded is not saturated
    loads[walk[0]] = PodLoad(in_flight=3)  # within the bound (3 + 1 <= 4): affinity holds
    assert policy.choose(prefix, loads).order[0] == walk[0]
    busy = {p: PodLoad(in_flight=40) for p in PODS}  # at high load the bound is relative: 1.25 × mean
    busy[walk[0]] = PodLoad(in_flight=52)  # bound ceil(1.25 * 173 / 4) = 55 >= 53
    assert policy.choose(prefix, busy).order[0] == walk[0]
    busy[walk[0]] = PodLoad(in_flight=56)  # bound ceil(1.25 * 177 / 4) = 56 < 57
    assert policy.choose(prefix, busy).order[0] == walk[1]


def test_scraped_queues_count_as_load_and_the_router_s_own_count_is_a_floor():
    assert PodLoad(in_flight=1, waiting=3, running=4).load == 7
    assert PodLoad(in_flight=9, waiting=3, running=4).load == 9  # the scrape lags the router
    assert PodLoad(in_flight=2).load == 2  # a stale scrape: the router's count only


def test_saturated_pods_take_nothing_and_all_saturated_means_no_pod():
    limits = Limits(max_waiting=4, max_in_flight=10, kv_full=0.95)
    assert limits.saturated(PodLoad(waiting=4))
    assert limits.saturated(PodLoad(in_flight=10))
    assert limits.saturated(PodLoad(waiting=1, kv_usage=0.96))
    assert not limits.saturated(PodLoad(waiting=0, kv_usage=0.99))  # a full cache with no queue still admits
    assert not limits.saturated(PodLoad(waiting=3, in_flight=9, kv_usage=0.5))
    for policy in (PrefixAffinity(limits=limits), LeastLoad(limits=limits)):
        loads = idle()
        loads[PODS[0]] = PodLoad(waiting=5)
        assert PODS[0] not in policy.choose("x", loads).order
        assert policy.choose("x", {p: PodLoad(waiting=5) for p in PODS}).order == []
    assert PrefixAffinity().choose("x", {}).order == []


def test_least_load_orders_by_load_then_kv_usage():
    loads = {"a": PodLoad(in_flight=3), "b": PodLoad(in_flight=1, kv_usage=0.5), "c": PodLoad(in_flight=1)}
    assert LeastLoad().choose("x", loads).order == ["c", "b", "a"]


def test_the_prompt_prefix_follows_the_conversation_and_is_cut():
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert prompt_prefix(chat, 100) == "<system>be brief<user>hi"
    later = {
        "messages": chat["messages"] + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    }
    assert prompt_prefix(later, 100) == prompt_prefix(chat, 100)  # a later turn keeps its conversation's pod
    assert prompt_prefix(chat, 10) == "<system>be"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]}
    assert prompt_prefix(parts, 100) == "<user>a"
    assert prompt_prefix({"prompt": "abcdef"}, 3) == "abc"
    assert prompt_prefix({"prompt": ["first", "second"]}, 100) == "first"
    assert prompt_prefix({"prompt": [1, 2, 3]}, 100) == "1 2 3"
    assert prompt_prefix({"input": "to embed"}, 100) == "to embed"
    assert prompt_prefix({"messages": "not a list"}, 10) == ""


def isvc(spec: dict, status: dict | None = None) -> dict:
    return {"metadata": {"name": "llama", "namespace": "ml"}, "spec": spec, "status": status or {}}


def test_an_inference_service_s_route():
    r = isvc_route(isvc({"model": {"uri": "hf://a/b"}}), ["http://10.0.0.1:8000"])
    assert (r.model, r.endpoints, r.scales_to_zero) == ("llama", ("http://10.0.0.1:8000",), False)
    named = isvc_route(isvc({"model": {"uri": "hf://a/b", "name": "meta/llama"}}), [])
    assert named.model == "meta/llama"
    zero = isvc_route(isvc({"model": {"uri": "x"}, "autoscaling": {"minReplicas": 0, "idleSeconds": 60}}), [])
    assert zero.scales_to_zero and zero.scale_target == ("ml", "llama") and zero.idle_seconds == 60
    off = isvc_route(isvc({"model": {"uri": "x"}, "autoscaling": {"enabled": False, "minReplicas": 0}}), [])
    assert not off.scales_to_zero
    held = {"conditions": [{"type": "WorkloadReady", "status": "False", "reason": "InsufficientGPUMemory"}]}
    too_big = isvc_route(isvc({"model": {"uri": "x"}, "autoscaling": {"minReplicas": 0}}, held), [])
    assert not too_big.scales_to_zero  # held at 0 by the fit check: a request must not wake it into a refusal


RUNTIME_METRICS = """# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny"} 3.0
vllm:num_requests_waiting{model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{model_name="tiny"} 0.25
kubellm_num_requests_waiting{model_name="tiny"} 2.0
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="tiny"} 0.0
vllm:request_success_total{finished_reason="length",model_name="tiny"} 5.0
vllm:request_success_total{finished_reason="stop",model_name="tiny"} 2.0
"""


def test_a_pod_s_load_is_read_from_its_vllm_gauges():
    assert parse_load(RUNTIME_METRICS) == (2.0, 3.0, 0.25)
    assert parse_load("vllm:num_requests_waiting 1\n") == (1.0, None, None)
    assert parse_load("") == (None, None, None)


def test_a_pod_s_finished_requests_are_read_so_traffic_around_the_router_counts_as_activity():
    assert parse_finished(RUNTIME_METRICS) == 7.0
    assert parse_finished("vllm:num_requests_waiting 1\n") is None


def test_a_pod_s_deletion_cost_is_its_load_so_idle_pods_go_first():
    assert deletion_cost(PodLoad()) == 0
    assert deletion_cost(PodLoad(in_flight=2, running=3, waiting=4)) == 7
    assert deletion_cost(PodLoad(in_flight=5, kv_usage=0.3)) == 5
    assert deletion_cost(PodLoad(running=9)) > deletion_cost(PodLoad(running=1))
