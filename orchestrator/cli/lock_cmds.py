"""The lock beside a profile: `lock PROFILE` writes it from what is installed here, `lock verify PROFILE`
checks this machine against it. `tune` (measure_cmds) writes the tuned flags into the same file."""

from __future__ import annotations

import json
import sys

import click


@click.command("lock")
@click.argument("words", nargs=-1, required=True, metavar="[verify] PROFILE")
@click.option("--json", "as_json", is_flag=True)
def lock(words: tuple[str, ...], as_json: bool) -> None:
    """Pin what this profile runs: per server the engine build (version, commit, sha256) or image digest,
    the model's size and sha256, and the machine, in PROFILE.lock.yaml beside it. `lock verify PROFILE`
    names every difference between the lock and this machine (exit 1 when any)."""
    from orchestrator import pipeline

    if words[0] == "verify":
        if len(words) != 2:
            raise click.UsageError("orchestrate lock verify PROFILE")
        rows = pipeline.verify_lock(words[1])
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                for note in row["notes"]:
                    click.echo(f"note: {note}", err=True)
                if row["ok"]:
                    tuned = " ".join(f"{f} {v}" if v is not None else f for f, v in row["tuned"]) or "none"
                    click.echo(f"{row['server']}: matches the lock (tuned flags: {tuned})")
                for d in row["drift"]:
                    click.echo(f"{row['server']}: drift: {d}")
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    if len(words) != 1:
        raise click.UsageError("orchestrate lock PROFILE, or orchestrate lock verify PROFILE")
    path, said = pipeline.write_lock(words[0])
    for line in said:
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps({"lock": str(path), "changes": said}, indent=2))
    else:
        click.echo(f"wrote {path}")
