"""Staged health checks. Each stage answers ready / pending / failed(reason); a dead process ends
the wait at once, so a crash is reported in well under a second instead of after a timeout.

Stages: 1 process alive, 2 port accepting, 3 engine readiness endpoint, 4 /v1/models lists the
served name, 5 a real 1-token completion (time to first token), 6 effective settings match the
plan (llama.cpp/ik_llama /props: per-slot context and slot count; vLLM/SGLang /v1/models:
max_model_len).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.plan.model import ServerPlan, client_host

STAGES = ("process", "port", "ready", "models", "completion", "settings")
READY, PENDING, FAILED = "ready", "pending", "failed"


@dataclass
class StageResult:
    status: str
    detail: str = ""


@dataclass
class Response:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class HttpError(Exception):
    """Connection refused/reset or timeout talking to the server."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind      # refused | timeout | error


def http(method: str, host: str, port: int, path: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> Response:
    """One loopback HTTP request with the standard library (no proxies, no 150 ms import of requests)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers={**hdrs, **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, r.read().decode("utf-8", "replace"))
    except TimeoutError as exc:
        raise HttpError("timeout", f"timed out after {timeout:.0f}s") from exc
    except ConnectionRefusedError as exc:
        raise HttpError("refused", "connection refused") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise HttpError("error", f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


@dataclass
class HealthReport:
    ok: bool
    stage: str                          # last stage reached (the failing one when not ok)
    detail: str = ""
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    passed: list[str] = field(default_factory=list)
    exit_code: int | None = None


class Prober:
    """HTTP probes against one server, API key sent when configured."""

    def __init__(self, sp: ServerPlan, api_key: str | None, timeout: float = 5.0) -> None:
        self.sp = sp
        self.host = sp.client_host
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.ttft_s: float | None = None

    def get(self, path: str, timeout: float | None = None) -> Response:
        return http("GET", self.host, self.sp.port, path, headers=self.headers, timeout=timeout or self.timeout)

    def post(self, path: str, body: Any, timeout: float) -> Response:
        return http("POST", self.host, self.sp.port, path, body, self.headers, timeout)

    def port(self) -> StageResult:
        try:
            with socket.create_connection((self.sp.client_host, self.sp.port), timeout=1.0):
                return StageResult(READY)
        except OSError as exc:
            return StageResult(PENDING, f"connect: {exc.strerror or exc}")

    def _fetch(self, path: str) -> Response | StageResult:
        """GET path: the response when it answered 200, else the stage result its answer means."""
        try:
            r = self.get(path)
        except HttpError as exc:
            return StageResult(PENDING, f"{path}: {exc}")
        if r.status_code == 200:
            return r
        if r.status_code in (401, 403):
            return StageResult(FAILED, f"{path} {r.status_code}: the API key was refused")
        return StageResult(PENDING, f"{path} {r.status_code} {r.text[:80].strip()}".rstrip())

    def ready(self) -> StageResult:
        assert self.sp.health is not None
        r = self._fetch(self.sp.health.ready_path)
        return r if isinstance(r, StageResult) else StageResult(READY)

    def models(self) -> StageResult:
        assert self.sp.health is not None
        r = self._fetch(self.sp.health.models_path)
        if isinstance(r, StageResult):
            return r
        try:
            ids = [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError):
            return StageResult(PENDING, f"/v1/models: unexpected answer {r.text[:80]!r}")
        if self.sp.served_name in ids:
            return StageResult(READY)
        return StageResult(FAILED, f"/v1/models lists {ids}, not the planned name {self.sp.served_name!r}")

    def completion(self) -> StageResult:
        body = {"model": self.sp.served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        t0 = time.perf_counter()
        try:
            r = self.post("/v1/completions", body, timeout=max(self.timeout, 60))
        except HttpError as exc:
            return StageResult(FAILED, f"1-token completion: {exc}")
        if r.status_code == 503:
            return StageResult(PENDING, "completion 503 (still loading)")
        if r.status_code != 200:
            return StageResult(FAILED, f"1-token completion answered {r.status_code}: {r.text[:200]}")
        try:
            choices = r.json()["choices"]
        except (ValueError, KeyError):
            return StageResult(FAILED, f"1-token completion returned no choices: {r.text[:200]}")
        if not choices:
            return StageResult(FAILED, "1-token completion returned no choices")
        self.ttft_s = time.perf_counter() - t0
        return StageResult(READY, f"time to first token {self.ttft_s * 1000:.0f} ms")

    def settings(self) -> StageResult:
        assert self.sp.health is not None
        if not self.sp.health.props_path:
            return self._models_settings()
        try:
            r = self.get(self.sp.health.props_path)
            props = r.json() if r.status_code == 200 else None
        except (HttpError, ValueError):
            props = None
        if not isinstance(props, dict):
            return StageResult(READY, "settings endpoint unavailable; skipped")
        want = planned_settings(self.sp)
        got = {"n_ctx": (props.get("default_generation_settings") or {}).get("n_ctx"),
               "total_slots": props.get("total_slots")}
        wrong = [f"{k} is {got[k]}, plan says {v}" for k, v in want.items() if got.get(k) is not None and got[k] != v]
        if wrong:
            return StageResult(FAILED, "effective settings differ from the plan: " + "; ".join(wrong))
        return StageResult(READY, ", ".join(f"{k}={got[k]}" for k in want if got.get(k) is not None))


    def _models_settings(self) -> StageResult:
        """vLLM and SGLang list each model's max_model_len in /v1/models: it must be the planned context."""
        assert self.sp.health is not None
        want = planned_settings(self.sp).get("max_model_len")
        if want is None:
            return StageResult(READY, "no settings endpoint for this engine")
        r = self._fetch(self.sp.health.models_path)
        if isinstance(r, StageResult):
            return StageResult(READY, f"settings unavailable ({r.detail}); skipped")
        entry: dict[str, Any] = {}
        try:
            entry = next((m for m in r.json().get("data", []) if m.get("id") == self.sp.served_name), {})
        except (ValueError, AttributeError):
            pass
        got = entry.get("max_model_len")
        if got is None:
            return StageResult(READY, "max_model_len not reported; skipped")
        if got != want:
            return StageResult(FAILED, f"effective settings differ from the plan: max_model_len is {got}, "
                                       f"plan says {want}")
        return StageResult(READY, f"max_model_len={got}")


MODEL_LEN_ENGINES = ("vllm", "sglang")         # /v1/models: max_model_len


def planned_settings(sp: ServerPlan) -> dict[str, int]:
    """Settings the plan asked for that the server reports back: llama-server's per-slot context and
    slot count (/props), vLLM's and SGLang's max_model_len (/v1/models)."""
    from orchestrator.catalog import GGUF_ENGINES  # after the spawn: the catalog's YAML can wait

    settings = sp.settings
    if settings is None:
        return {}
    if sp.engine in GGUF_ENGINES:
        return {"n_ctx": settings.context, "total_slots": settings.slots}
    if sp.engine in MODEL_LEN_ENGINES:
        return {"max_model_len": settings.context}
    return {}


def wait_healthy(sp: ServerPlan, prober: Prober, poll_exit: Callable[[], int | None], timeout_s: float,
                 on_stage: Callable[[str, StageResult], None] | None = None, interval: float = 0.02,
                 on_wait: Callable[[str, float], None] | None = None) -> HealthReport:
    """Walk the stages in order until all pass, the process exits, a stage fails, or time runs out.
    on_wait(stage, seconds waited) after each probe that is still pending."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    passed: list[str] = []
    checks: dict[str, Callable[[], StageResult]] = {
        "process": lambda: StageResult(READY), "port": prober.port, "ready": prober.ready,
        "models": prober.models, "completion": prober.completion, "settings": prober.settings,
    }
    for stage in STAGES:
        last = StageResult(PENDING)
        while True:
            code = poll_exit()
            if code is not None:
                return HealthReport(False, stage, f"process exited with code {code} during stage '{stage}'",
                                    elapsed_s=time.monotonic() - t0, passed=passed, exit_code=code)
            last = checks[stage]()
            if last.status == READY:
                passed.append(stage)
                if on_stage:
                    on_stage(stage, last)
                break
            if last.status == FAILED:
                return HealthReport(False, stage, last.detail, elapsed_s=time.monotonic() - t0, passed=passed)
            if time.monotonic() >= deadline:
                return HealthReport(False, stage, f"not ready after {timeout_s:.0f}s (stage '{stage}': "
                                    f"{last.detail or 'pending'})", elapsed_s=time.monotonic() - t0, passed=passed)
            if on_wait:
                on_wait(stage, time.monotonic() - t0)
            time.sleep(interval)
    return HealthReport(True, "settings", "", prober.ttft_s, time.monotonic() - t0, passed)


def quick_probe(sp_host: str, port: int, path: str, api_key: str | None, timeout: float = 3.0) -> str:
    """For status: 'healthy' | 'loading' | 'busy' (no answer in time) | 'down' (refused)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = http("GET", client_host(sp_host), port, path, headers=headers, timeout=timeout)
    except HttpError as exc:
        return "busy" if exc.kind == "timeout" else "down"
    if r.status_code == 200:
        return "healthy"
    if r.status_code == 503:
        try:
            msg = json.loads(r.text).get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            msg = ""
        return "loading" if "load" in msg.lower() or not msg else "busy"
    return f"http {r.status_code}"
