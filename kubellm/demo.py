"""`make demo`: serve the real SmolLM2-135M-Instruct with `kubellm serve` and talk to it with the official
openai client, streaming, then once with a JSON schema for the answer; then shut the server down gracefully."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kubellm.runtime.process import free_port
from kubellm.weights.smollm2 import demo_model_dir


def main() -> int:
    import httpx
    import openai

    t0 = time.monotonic()
    model = demo_model_dir()
    print(f"model: {model} (ready in {time.monotonic() - t0:.1f}s)")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kubellm.cli",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "smollm2",
        "--api-key",
        "demo-key",
        "--dtype",
        "float32",
    ]
    print("$", " ".join(cmd))
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kubellm serve did not become ready")
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo-key")
        for question in ("What is the capital of France?", "Write a haiku about Kubernetes."):
            print(f"\nuser: {question}\nsmollm2: ", end="", flush=True)
            stream = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": question}],
                max_tokens=64,
                temperature=0,
                stream=True,
                extra_body={"repetition_penalty": 1.2},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        # structured output: the answer must match a JSON schema (llguidance masks what does not fit)
        schema = {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "country"],
            "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        }
        question = "Which city is the Eiffel Tower in? Answer in JSON."
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        )
        print(f"\nuser: {question} (response_format: a JSON schema)\nsmollm2: {answer.choices[0].message.content}")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        tokens = [line for line in metrics.splitlines() if line.startswith("kubellm_generation_tokens_total")]
        print(f"\n/metrics: {tokens[0] if tokens else '?'}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server drained and exited with {code}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
