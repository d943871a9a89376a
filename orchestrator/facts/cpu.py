"""This CPU's instruction-set flags: read by engine builds (what a native build compiles in, and
whether an installed one can run here) and by the plan cache (a plan made on another CPU is made
again). A leaf with no imports but the standard library: `up` reads it before it spawns the engine."""

from __future__ import annotations


def host_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty where there is no /proc/cpuinfo, or
    where it has no x86 `flags` line)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
