"""Engine builds: what is built when, their progress, and what an interrupt leaves behind.

Real processes throughout: a child printing ninja's `[n/N]` lines, and real CMake + Ninja builds of a
small C project whose targets carry the engine's tool names (source= a tree, as `engines install
--source` takes), in a cache folder of the test's own."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli.progress import Display, Meter, duration
from orchestrator.facts.installed import install_dir, installed
from orchestrator.provision import builds

needs_cmake = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("ninja")), reason="cmake and ninja")

NINJA_LIKE = """
import sys, time
total = int(sys.argv[1])
for i in range(1, total + 1):
    print(f"[{i}/{total}] Building C object ggml/src/CMakeFiles/ggml-base.dir/part{i}.c.o", flush=True)
    if i % 7 == 0:
        print("warning: a compiler note that is not a step", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_real_build_step_feeds_plain_progress_lines(tmp_path: Path) -> None:
    """Not a terminal: the first step, a line every interval and the last; the log keeps every line."""
    out = io.StringIO()
    shown = Display(out, tty=False, interval=0.25)
    log = tmp_path / "build.log"
    with log.open("w") as fh:
        rc = builds.run_step([sys.executable, "-c", NINJA_LIKE, "60", "0.02"], fh, shown.steps("gemma", "engine build"))
    assert rc == 0
    logged = log.read_text().splitlines()
    assert len(logged) == 60 + 60 // 7 and logged[-1].startswith("[60/60] ")
    lines = out.getvalue().splitlines()
    assert lines[0] == "  [gemma] engine build: 1/60 steps (2%), 0s elapsed"
    assert lines[-1].startswith("  [gemma] engine build: 60/60 steps (100%), ") and "left" not in lines[-1]
    assert 3 <= len(lines) <= 12, lines   # throttled: ~1.2 s of steps at one line per 0.25 s
    pattern = re.compile(r"^  \[gemma\] engine build: (\d+)/60 steps \(\d+%\), \d+s elapsed(, ~\d+s left)?$")
    counts = [int(pattern.match(line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert counts == sorted(counts) and "\r" not in out.getvalue()


def test_a_long_step_still_gets_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile step that takes a while: the last count comes again with the time moving on."""
    monkeypatch.setattr(builds, "HEARTBEAT_S", 0.1)
    script = ("import time\nprint('[1/4] Building C object a.c.o', flush=True)\ntime.sleep(1.0)\n"
              "for i in range(2, 5):\n    print(f'[{i}/4] Building C object b{i}.c.o', flush=True)\n")
    out = io.StringIO()
    shown = Display(out, tty=False, interval=0.3)
    with (tmp_path / "log").open("w") as fh:
        assert builds.run_step([sys.executable, "-c", script], fh, shown.steps("gemma", "engine build")) == 0
    lines = out.getvalue().splitlines()
    during = [line for line in lines if line.startswith("  [gemma] engine build: 1/4 steps")]
    assert len(during) >= 3, lines   # at 0 s, then about every 0.3 s of the 1 s step
    assert lines[-1].startswith("  [gemma] engine build: 4/4 steps (100%)")


def test_an_interrupt_stops_the_build_step(tmp_path: Path) -> None:
    pids: list[int] = []

    def on_step(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    script = "import os, sys, time\nprint(os.getpid(), flush=True)\n" + NINJA_LIKE
    with (tmp_path / "log").open("w") as fh, pytest.raises(KeyboardInterrupt):
        builds.run_step([sys.executable, "-c", script, "100", "0.05"], fh, on_step)
    pids.append(int((tmp_path / "log").read_text().split()[0]))
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)   # killed and reaped, not left compiling


def test_an_interrupt_stops_what_the_step_started(tmp_path: Path) -> None:
    """cmake --build runs ninja, ninja runs compilers: an interrupt stops all of them, not cmake alone."""
    grandchild = ("import subprocess, sys, time\n"
                  "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                  "print(child.pid, flush=True)\nprint('[1/9] Building C object x.c.o', flush=True)\n"
                  "time.sleep(60)\n")

    def on_step(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with (tmp_path / "log").open("w") as fh, pytest.raises(KeyboardInterrupt):
        builds.run_step([sys.executable, "-c", grandchild], fh, on_step)
    pid = int((tmp_path / "log").read_text().split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            break   # killed; its parent (also killed) never reaped it, init will
        time.sleep(0.05)
    else:
        pytest.fail(f"the step's own child {pid} survived the interrupt")


def test_terminal_format_redraws_one_line() -> None:
    now = [100.0]
    out = io.StringIO()
    shown = Display(out, tty=True, clock=lambda: now[0])
    step = shown.steps("gemma", "engine build")
    step(1, 216)
    now[0] = 160.0
    step(54, 216)
    shown.line("  [gemma] engine: done")
    now[0] = 400.0
    step(216, 216)
    text = out.getvalue()
    assert "\r  [gemma] engine build [------------------------] 1/216 steps (0%), 0s elapsed\x1b[K" in text
    assert ("\r  [gemma] engine build [######------------------] 54/216 steps (25%), 1m00s elapsed, ~3m00s left"
            "\x1b[K") in text
    assert "\r\x1b[K  [gemma] engine: done\n" in text          # a message clears the bar line first
    assert text.endswith("216/216 steps (100%), 5m00s elapsed\x1b[K\n")


def test_waits_and_bytes() -> None:
    m = Meter("gemma", "health", "s", 0.0, 12.4, 105.0, "stage ready")
    assert m.plain(0) == "  [gemma] health: stage ready, 12s of 1m45s"
    b = Meter("gemma", "model download", "bytes", 0.0, 60 * 2**20, 240 * 2**20)
    assert b.plain(4.0) == "  [gemma] model download: 60.0 MiB/240.0 MiB (25%), 4s elapsed, ~12s left"
    assert duration(3725) == "1h02m"
    out = io.StringIO()
    shown = Display(out, tty=False, interval=5.0, clock=lambda: 0.0)
    shown.update("gemma", "health", 2.0, 105.0, "s", "stage ready")
    assert out.getvalue() == ""   # a short wait writes nothing; the stages it passes are reported
    shown.update("gemma", "health", 6.0, 105.0, "s", "stage ready")
    assert out.getvalue() == "  [gemma] health: stage ready, 6s of 1m45s\n"


# --------------------------------------------------------------------------- real builds of a toy tree

TOY_CMAKE = """\
cmake_minimum_required(VERSION 3.16)
project(toy C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
file(GLOB parts ${CMAKE_SOURCE_DIR}/lib/*.c)
add_library(core STATIC ${parts})
foreach(tool llama-server llama-bench llama-perplexity)
  add_executable(${tool} ${CMAKE_SOURCE_DIR}/main.c)
  target_compile_definitions(${tool} PRIVATE TOOL="${tool}")
  target_link_libraries(${tool} core)
endforeach()
"""


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CCACHE_DISABLE", "1")
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(TOY_CMAKE)
    for i in range(8):
        (src / "lib" / f"p{i}.c").write_text(f"int part{i}(void) {{ return {i}; }}\n")
    (src / "main.c").write_text('#include <stdio.h>\nint part0(void);\n'
                                'int main(void) { puts(TOOL); return part0(); }\n')
    return src


@needs_cmake
def test_up_builds_the_server_only_and_a_tool_is_added_later(toy: Path) -> None:
    steps: list[tuple[int, int]] = []
    inst = builds.build("llama.cpp", "cpu", source=toy, jobs=2, log=lambda m: None,
                        on_step=lambda d, t: steps.append((d, t)))
    assert inst.has("llama-server") and not inst.has("llama-bench") and not inst.has("llama-perplexity")
    assert steps and steps[-1][0] == steps[-1][1] and all(t == steps[0][1] for _, t in steps)
    server_mtime = inst.binary().stat().st_mtime_ns
    again = builds.build("llama.cpp", "cpu", source=toy, log=lambda m: None)   # nothing to do
    assert again.binary().stat().st_mtime_ns == server_mtime
    more = builds.build("llama.cpp", "cpu", source=toy, jobs=2, log=lambda m: None, tools=("llama-perplexity",))
    assert more.has("llama-perplexity") and more.has("llama-server") and not more.has("llama-bench")
    assert more.binary().stat().st_mtime_ns == server_mtime   # the server that ran before is the one kept
    assert subprocess.run([str(more.binary("llama-perplexity"))], capture_output=True, text=True).stdout == \
        "llama-perplexity\n"


@needs_cmake
def test_ctrl_c_during_a_build_leaves_no_install_and_the_next_build_is_clean(toy: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        builds.build("llama.cpp", "cpu", source=toy, jobs=1, log=lambda m: None, on_step=interrupt)
    dest = install_dir("llama.cpp", "cpu")
    assert installed("llama.cpp", "cpu") is None and not dest.exists()
    # what a crash between staging and rename would leave: removed by the next build, never read
    stale = dest.parent / f".{dest.name}.k3x9"
    (stale / "bin").mkdir(parents=True)
    inst = builds.build("llama.cpp", "cpu", source=toy, jobs=2, log=lambda m: None)
    assert inst.has("llama-server") and not stale.exists()
    assert sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(".")) == [f".{dest.name}.lock"]


@needs_cmake
def test_engines_install_on_a_terminal_draws_one_bar(toy: Path, tmp_path: Path) -> None:
    """tmux is the terminal: the bar is redrawn in place, so the screen holds one progress line."""
    if not shutil.which("tmux"):
        pytest.skip("tmux")
    session = f"orchestrator-progress-{os.getpid()}"
    done = tmp_path / "done"
    cmd = (f"ORCHESTRATOR_CACHE={tmp_path / 'cache'} CCACHE_DISABLE=1 {sys.executable} -m orchestrator engines "
           f"install llama.cpp --source {toy}; echo rc=$? > {done}; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", "bash", "-c", cmd],
                   check=True, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.read_text().strip() == "rc=0", screen
    bars = [line for line in screen.splitlines() if "steps" in line]
    assert len(bars) == 1, screen
    assert re.search(r"\[llama\.cpp\] build \[#{24}\] (\d+)/\1 steps \(100%\), \d+s elapsed", bars[0]), screen


@needs_cmake
def test_a_native_build_made_on_another_cpu_is_built_again(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache moved to another machine (or the VM to another host) whose CPU lacks an instruction
    set the native build was compiled for: it would stop with an illegal instruction, so `locate`
    does not offer it and the next build replaces it."""
    from orchestrator.facts import installed as facts_installed

    here = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}
    monkeypatch.setattr(builds, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": here)
    inst = builds.build("llama.cpp", "cpu", source=toy, jobs=2, log=lambda m: None)
    assert inst.cpu_flags is not None and "avx512_vnni" in inst.cpu_flags
    assert "amx_int8" not in inst.cpu_flags, "llama.cpp builds leave the AMX kernels out"
    first = inst.binary().stat().st_mtime_ns
    older = {"sse4_2", "avx", "avx2", "fma", "f16c"}      # a Zen 2 / Haswell-class CPU
    monkeypatch.setattr(facts_installed, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": older)
    found = facts_installed.locate("llama.cpp", "cpu", "llama-server")
    assert found.path is None and "not usable on this CPU" in found.how and "avx512_vnni" in found.how
    assert "up builds it again" in found.how
    said: list[str] = []
    monkeypatch.setattr(builds, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": older)
    again = builds.build("llama.cpp", "cpu", source=toy, jobs=2, log=said.append)
    assert any("built natively on a CPU with avx512_vnni, avx512bw, avx512f" in m for m in said), said
    assert again.binary().stat().st_mtime_ns != first and again.cpu_flags == sorted(older)
    monkeypatch.setattr(facts_installed, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": here)
    assert facts_installed.locate("llama.cpp", "cpu", "llama-server").path == str(again.binary()), \
        "a build for an older CPU runs on a newer one"


def test_a_finished_step_reported_again_is_not_repeated() -> None:
    """pip goes on installing after its download is complete: the 100% line is written once."""
    now = [0.0]
    out = io.StringIO()
    shown = Display(out, tty=False, clock=lambda: now[0])
    mib = 2**20
    for t, done, total in [(0, 0, 54 * mib), (1, 54 * mib, 54 * mib), (1.5, 54 * mib, 227 * mib),
                           (2, 227 * mib, 227 * mib), (7, 227 * mib, 227 * mib), (12, 227 * mib, 227 * mib)]:
        now[0] = t
        shown.update("gemma", "model download", done, total, "bytes")
    lines = out.getvalue().splitlines()
    assert sum("227.0 MiB/227.0 MiB (100%)" in line for line in lines) == 1, lines
    assert any("54.0 MiB/54.0 MiB (100%)" in line for line in lines), "a new total is a new step"
