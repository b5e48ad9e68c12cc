"""Property: whatever the workload (aborts mid-prefill and mid-decode, preemptions, swaps, shared prefixes),
reference counts always match the live sequences, and every block is free again at the end."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.runtime import SamplingParams
from kubellm.runtime.engine.engine import LLMEngine

request = st.fixed_dictionaries(
    {
        "length": st.integers(1, 120),
        "shared_prefix": st.booleans(),  # start with a common 40-token prefix: exercises prefix-cache sharing
        "max_tokens": st.integers(1, 40),
        "n": st.integers(1, 3),
        "priority": st.integers(0, 3),
        "arrive_at": st.integers(0, 10),  # step at which it is added
        "abort_at": st.one_of(st.none(), st.integers(0, 30)),  # step at which it is aborted
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request, min_size=1, max_size=8),
    mode=st.sampled_from(["recompute", "swap"]),
    policy=st.sampled_from(["fcfs", "priority"]),
    num_blocks=st.integers(12, 40),
    budget=st.sampled_from([16, 48, 256]),
    cpu_blocks=st.integers(0, 30),
)
def test_blocks_balance_under_random_workloads(tiny_model, requests, mode, policy, num_blocks, budget, cpu_blocks):
    engine = LLMEngine.from_kwargs(
        tiny_model,
        block_size=8,
        num_gpu_blocks=num_blocks,
        max_num_batched_tokens=budget,
        preemption_mode=mode,
        scheduling_policy=policy,
        num_cpu_blocks=cpu_blocks,
        max_num_seqs=6,
    )
    bm, sched = engine.block_manager, engine.scheduler
    step, pending = 0, list(enumerate(requests))
    while pending or engine.has_unfinished_requests():
        for i, r in [p for p in pending if p[1]["arrive_at"] <= step]:
            prefix = [7] * 40 if r["shared_prefix"] else []
            prompt = (prefix + [(i * 31 + k) % 500 + 4 for k in range(r["length"])])[: engine.max_model_len - 1]
            params = SamplingParams(n=r["n"], temperature=0.7, seed=i, max_tokens=r["max_tokens"], ignore_eos=True)
            engine.add_request(f"r{i}", prompt, params, priority=r["priority"])
            pending.remove((i, r))
        for i, r in enumerate(requests):
            if r["abort_at"] == step:
                engine.abort_request(f"r{i}")
        engine.step()
        live = sched.running + sched.waiting + sched.swapped
        bm.check_invariants(live)
        step += 1
        assert step < 2000, "the engine made no progress"
    assert bm.num_free_blocks == bm.num_blocks
    assert len(bm.cpu_free) == bm.num_cpu_blocks
    bm.check_invariants([])
