"""Parse rendered argv lists with SGLang's own sglang.srt.server_args.prepare_server_args. Runs with the
SGLang parser environment's Python (orchestrate engines install sglang-parser):

    python sglang_args.py CASES.json OUT.json

CASES.json: {"cases": {name: {"argv": [...]}}}; a `--config FILE` in an argv is read and merged by
SGLang itself. OUT.json: {"facts": {...}, "results": {name: {"ok", "error", "args"}}}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import logging
import sys

FIELDS = ("model_path", "served_model_name", "host", "port", "context_length", "max_running_requests", "tp_size",
          "mem_fraction_static", "attention_backend", "kv_cache_dtype", "disable_radix_cache",
          "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
          "speculative_eagle_topk", "speculative_num_draft_tokens", "enable_metrics", "api_key",
          "trust_remote_code", "device", "nnodes", "node_rank", "dist_init_addr", "tool_call_parser",
          "reasoning_parser")


def main(cases_path: str, out_path: str) -> None:
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    cases = json.loads(open(cases_path).read())["cases"]
    results: dict[str, dict[str, object]] = {}
    for name, case in cases.items():
        err = io.StringIO()
        result: dict[str, object] = {"ok": False, "error": None, "args": {}}
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                sa = prepare_server_args(list(case["argv"]))
            args = {k: getattr(sa, k, None) for k in FIELDS}
            algo = SpeculativeAlgorithm.from_string(sa.speculative_algorithm)
            args["speculative_algorithm_resolved"] = getattr(algo, "name", str(algo))
            result["args"] = args
            result["ok"] = True
        except SystemExit as exc:
            result["error"] = f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1:]}"
        except Exception as exc:  # the engine refused the values: report, don't stop the batch
            result["error"] = f"{type(exc).__name__}: {exc}"
        results[name] = result
    logging.shutdown()
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    choices = {a.dest: [c for c in (a.choices or []) if c != "auto"] for a in parser._actions
               if a.dest in ("tool_call_parser", "reasoning_parser")}
    facts = {"version": importlib.metadata.version("sglang"),
             "spec_algorithms": [a.name for a in SpeculativeAlgorithm],
             "tool_parsers": sorted(choices.get("tool_call_parser") or []),
             "reasoning_parsers": sorted(choices.get("reasoning_parser") or [])}
    with open(out_path, "w") as fh:
        json.dump({"facts": facts, "results": results}, fh, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
