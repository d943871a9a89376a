"""Parse rendered argv lists with vLLM's own argument parser. Runs with the vLLM environment's Python:

    python vllm_args.py CASES.json OUT.json

CASES.json: {"cases": {name: {"argv": [...], "engine_config": bool}}}. Each argv is parsed the way
`python -m vllm.entrypoints.openai.api_server` parses it (make_arg_parser on a FlexibleArgumentParser,
validate_parsed_serve_args, AsyncEngineArgs.from_cli_args); with engine_config the resulting
EngineArgs also build the full VllmConfig on this (CPU) platform, which loads the model's config.json.
OUT.json: {"facts": {...vLLM's own tables...}, "results": {name: {"ok", "error", "args", "config"}}}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.util
import io
import json
import sys
import typing


def plain(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def literal_values(tp: object) -> list[str]:
    out: list[str] = []
    for arg in typing.get_args(tp):
        out += literal_values(arg) if typing.get_args(arg) else [arg]  # type: ignore[list-item]
    return out


ARGS = ("model", "served_model_name", "max_model_len", "max_num_seqs", "tensor_parallel_size",
        "gpu_memory_utilization", "kv_cache_dtype", "enable_prefix_caching", "speculative_config",
        "attention_backend", "dtype", "trust_remote_code", "kv_cache_memory_bytes", "enforce_eager",
        "pipeline_parallel_size", "nnodes", "node_rank", "master_addr", "reasoning_parser")
NAMESPACE = ("host", "port", "api_key", "model_tag", "headless", "enable_auto_tool_choice", "tool_call_parser")


def load_parsers(ns: object) -> dict[str, object]:
    """Import the classes the named tool-call and reasoning parsers resolve to, as the server does at
    start: a name the registry does not have raises here."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    out: dict[str, object] = {}
    tool, reasoning = getattr(ns, "tool_call_parser", None), getattr(ns, "reasoning_parser", None)
    if tool:
        out["tool_call_parser_class"] = ToolParserManager.get_tool_parser(tool).__name__
    if reasoning:
        out["reasoning_parser_class"] = ReasoningParserManager.get_reasoning_parser(reasoning).__name__
    return out


def engine_config(engine_args: object) -> dict[str, object]:
    cfg = engine_args.create_engine_config()  # type: ignore[attr-defined]
    spec = cfg.speculative_config
    return {
        "device_type": cfg.device_config.device_type,
        "max_model_len": cfg.model_config.max_model_len,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
        "cache_dtype": plain(cfg.cache_config.cache_dtype),
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "tensor_parallel_size": cfg.parallel_config.tensor_parallel_size,
        "served_model_name": plain(cfg.model_config.served_model_name),
        "speculative_method": spec.method if spec else None,
        "num_speculative_tokens": spec.num_speculative_tokens if spec else None,
        "prompt_lookup_max": getattr(spec, "prompt_lookup_max", None) if spec else None,
    }


def main(cases_path: str, out_path: str) -> None:
    import vllm
    from vllm.config.cache import CacheDType
    from vllm.config.speculative import SpeculativeConfig, SpeculativeMethod
    from vllm.engine.arg_utils import AsyncEngineArgs
    try:   # 0.32.0; 0.34.0 moved them to vllm.entrypoints.common.cli_args
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:
        from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cases = json.loads(open(cases_path).read())["cases"]
    parser = make_arg_parser(FlexibleArgumentParser())
    results: dict[str, dict[str, object]] = {}
    for name, case in cases.items():
        err = io.StringIO()
        result: dict[str, object] = {"ok": False, "error": None, "args": {}, "config": None}
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(case["argv"])
                validate_parsed_serve_args(ns)
                engine_args = AsyncEngineArgs.from_cli_args(ns)
            result["args"] = {**{k: plain(getattr(engine_args, k, None)) for k in ARGS},
                              **{k: plain(getattr(ns, k, None)) for k in NAMESPACE}, **load_parsers(ns)}
            if case.get("engine_config"):
                result["config"] = engine_config(engine_args)
            result["ok"] = True
        except SystemExit as exc:
            result["error"] = f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1:]}"
        except Exception as exc:  # the engine refused the values: report, don't stop the batch
            result["error"] = f"{type(exc).__name__}: {exc}"
        results[name] = result
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    facts = {
        "version": vllm.__version__,
        "tool_parsers": sorted(ToolParserManager.list_registered()),
        "reasoning_parsers": sorted(ReasoningParserManager.list_registered()),
        "spec_methods": literal_values(SpeculativeMethod),
        "spec_config_fields": [f.name for f in dataclasses.fields(SpeculativeConfig)],
        "attention_backends": list(AttentionBackendEnum.__members__),
        "kv_cache_dtypes": literal_values(CacheDType),
        "process_module": importlib.util.find_spec("vllm.entrypoints.openai.api_server") is not None,
        "parser_defaults": {k: plain(getattr(AsyncEngineArgs, k, None)) for k in ARGS},
    }
    with open(out_path, "w") as fh:
        json.dump({"facts": facts, "results": results}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
