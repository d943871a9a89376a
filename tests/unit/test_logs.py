"""`orchestrate logs -f`: only what is appended after the start, from every file, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

from orchestrator.runtime.logs import follow, log_files
from orchestrator.runtime.state import StateStore


def test_follow_emits_only_appended_text_from_each_file_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    a, b = tmp_path / "d-a.log", tmp_path / "d-b.log"
    a.write_text("old a\n")
    b.write_text("old b\n")
    seen: list[str] = []
    polls = [0]

    def refresh() -> None:   # stands in for the writer: appends between polls, then the user presses Ctrl-C
        polls[0] += 1
        if polls[0] == 2:
            with a.open("a") as fh:
                fh.write("new a\n")
            with b.open("a") as fh:
                fh.write("new b\n")
        if polls[0] == 4:
            raise KeyboardInterrupt

    follow([a, b], seen.append, refresh, interval_s=0)
    assert seen == ["new a\n", "new b\n"]


def test_log_files_are_all_or_nothing(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    assert log_files(store, "dep") == []
    store.logs.mkdir(parents=True, exist_ok=True)
    store.log_path("dep", "one").write_text("x\n")
    assert log_files(store, "dep", "one") == [store.log_path("dep", "one")]
    assert log_files(store, "dep", "two") == []            # that server has no log
    assert log_files(store, "dep") == [store.log_path("dep", "one")]
