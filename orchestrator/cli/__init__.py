"""Command line: parse, call, print. Decisions live in the core modules.

The group and its one error boundary live here; the commands live beside it, by what they do:
plan_cmds (read a profile, start nothing), run_cmds (start, stop and look at servers), measure_cmds
(bench, eval), engine_cmds (engines, doctor). show holds the printers, common what they share."""

from __future__ import annotations

import signal
from typing import Any

import click

from orchestrator.cli.common import fail
from orchestrator.cli.engine_cmds import doctor, engines
from orchestrator.cli.lock_cmds import lock
from orchestrator.cli.measure_cmds import bench, eval_cmd
from orchestrator.cli.plan_cmds import fit_cmd, gpus, plan, render, schema, validate
from orchestrator.cli.run_cmds import compose, down, logs, status, up
from orchestrator.cli.tune_cmds import tune
from orchestrator.errors import OrchestratorError, ProfileError


class _Group(click.Group):
    """User errors end as one line and exit 1; a traceback only with -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProfileError as exc:
            fail([str(x) for x in exc.problems])
        except OrchestratorError as exc:
            fail([f"error: {exc}"])
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            fail([f"error: {type(exc).__name__}: {exc} — rerun with orchestrate -v for the traceback"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(package_name="orchestrator")
def main(verbose: bool) -> None:
    """Declarative deployments for local LLM servers (llama.cpp, ik_llama.cpp, vLLM, SGLang)."""
    # SIGTERM unwinds like Ctrl-C: servers that bench/eval started for their run (--up, --matrix) are
    # stopped by their finally blocks instead of being left running.
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


for _command in (validate, plan, fit_cmd, render, schema, gpus,     # plan_cmds
                 up, down, status, logs, compose,                    # run_cmds
                 bench, eval_cmd,                                    # measure_cmds
                 engines, doctor,                                    # engine_cmds
                 lock, tune):                                        # lock_cmds, tune_cmds
    main.add_command(_command)


if __name__ == "__main__":
    main()
