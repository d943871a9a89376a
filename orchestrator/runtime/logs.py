"""Server logs: which files a deployment's logs are, and following them as they grow (`orchestrate logs`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.plan.model import container_name
from orchestrator.runtime.state import StateStore, valid_name


def log_files(store: StateStore, deployment: str, server: str | None = None) -> list[Path]:
    """The deployment's log files, or one server's; empty unless every one of them exists."""
    if server:
        paths = [store.log_path(deployment, server)]
    else:
        prefix = container_name(valid_name(deployment), "")
        paths = sorted(p for p in store.logs.glob("*.log") if p.name.startswith(prefix))
    return paths if paths and all(p.exists() for p in paths) else []


def follow(paths: list[Path], emit: Callable[[str], None], refresh: Callable[[], None] = lambda: None,
           interval_s: float = 0.5) -> None:
    """Hand `emit` the text appended to each file from now on, polling every `interval_s`, until Ctrl-C
    (which returns normally). `refresh` runs before each poll (containers: copy their log into the
    state dir first)."""
    offsets = {p: p.stat().st_size for p in paths}
    try:
        while True:
            refresh()
            for p in paths:
                with p.open("rb") as fh:
                    fh.seek(offsets[p])
                    chunk = fh.read()
                offsets[p] += len(chunk)
                if chunk:
                    emit(chunk.decode("utf-8", "replace"))
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


def tail(path: str | Path, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[-n:]
