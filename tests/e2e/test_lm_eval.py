"""A real evaluation client, unmodified, against `kubellm serve` (issue 21): lm-evaluation-harness's
local-completions scores a log-likelihood task (echo + logprobs, as every harness scores) and its
local-chat-completions runs a generation task, both on datasets shipped in tests/lm_eval_tasks/. The
log-likelihoods match lm-eval's own HF transformers backend on the same model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.server import ServerProcess

lm_eval = pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def open_server(tiny_model):
    """A server without API keys (lm-eval's local models send none)."""
    s = ServerProcess(tiny_model, "--max-model-len", "256", "--served-model-name", "tiny")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def evaluate(model: str, model_args: str, task: str, **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(ROOT)  # the tasks' data_files are relative to the repository
    try:
        return simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[task],
            task_manager=TaskManager(include_path=str(TASKS)),
            log_samples=True,
            **kw,
        )
    finally:
        os.chdir(cwd)


def loglikelihoods(results: dict, task: str) -> list[tuple[str, str, float, bool]]:
    out = []
    for sample in results["samples"][task]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            logprob, greedy = resp[0]
            out.append((context, continuation, float(logprob), bool(greedy)))
    return sorted(out)


def test_local_completions_loglikelihoods_match_hf(open_server, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = "kubellm_tiny_loglikelihood"
    ours = evaluate(
        "local-completions",
        f"model=tiny,base_url={open_server.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tiny_model},max_length=256,num_concurrent=1,max_retries=1",
        task,
    )
    hf = evaluate("hf", f"pretrained={tiny_model},dtype=float32,device=cpu", task)
    got, ref = loglikelihoods(ours, task), loglikelihoods(hf, task)
    assert len(got) == 10
    assert [(c, x) for c, x, _, _ in got] == [(c, x) for c, x, _, _ in ref]
    for (_, _, ll, greedy), (_, _, ll_ref, greedy_ref) in zip(got, ref):
        assert ll == pytest.approx(ll_ref, abs=1e-4)
        assert greedy == greedy_ref
    acc = ours["results"][task]["acc,none"]
    assert acc == pytest.approx(hf["results"][task]["acc,none"])
    print("\nlm-eval local-completions vs hf:", [(round(a[2], 5), round(b[2], 5)) for a, b in zip(got, ref)])


def test_local_chat_completions_generation_task(open_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = "kubellm_tiny_generation"
    results = evaluate(
        "local-chat-completions",
        f"model=tiny,base_url={open_server.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
        task,
        apply_chat_template=True,
    )
    samples = results["samples"][task]
    assert len(samples) == 3
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    assert "exact_match,none" in results["results"][task]
