"""The facts' plain data types, apart from the code that gathers them: the planner reads these and
nothing else of facts/ (an import rule), so planning can never start a probe by accident."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.catalog import Gpu


@dataclass(frozen=True)
class ModelFacts:
    name: str                     # file or repo stem
    format: str                   # gguf | hf
    location: str                 # expanded path, or hf reference
    exists: bool                  # local file/dir present
    quant: str | None
    params_b: float | None        # total parameters (billions)
    active_params_b: float | None # active parameters per token (MoE), else == params_b
    size_bytes: int | None        # file size, or estimate from params × bits
    size_is_estimate: bool
    arch: str | None = None
    n_layers: int | None = None
    trained_context: int | None = None
    has_mtp: bool | None = None   # nextn/MTP layers present (None: unknown)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "file"          # file | catalog | name: where the shape and size came from
    notes: tuple[str, ...] = ()   # what the facts rest on, when not the file itself
    defect: str | None = None     # what is wrong with the file that is there (not a model, truncated, a FIFO)

    @property
    def is_moe(self) -> bool:
        if self.metadata.get("expert_count"):
            return True
        return bool(self.params_b and self.active_params_b and self.active_params_b < self.params_b)

    @property
    def size_gib(self) -> float | None:
        return self.size_bytes / 2**30 if self.size_bytes else None


@dataclass(frozen=True)
class EngineVersion:
    engine: str
    version: str                          # b9093 | 55d3c05bf | 0.32.0
    source: str                           # how it was determined, for the plan
    flags: frozenset[str] | None = None   # options the binary's --help lists; None when not probed
    help: str = ""                        # the --help text (for value checks)
    binary: str | None = None
    # (flag, value, accepted) from the build's own parser, for flag_history options --help omits
    parser_answers: tuple[tuple[str, str | None, bool], ...] = ()

    def describe(self) -> str:
        return f"{self.version} ({self.source})"

    def accepted(self, flag: str, value: str | None = None) -> bool | None:
        """The build's own parser on an option its --help does not list (probed while gathering facts)."""
        for f, v, ok in self.parser_answers:
            if f == flag and v == value:
                return ok
        return None


@dataclass(frozen=True)
class Located:
    """The executable a server will run (for Python engines: the interpreter), and how it was found."""

    path: str | None
    how: str
    version: str | None = None       # engine version, where known
    usable: bool = True              # False: found, but it cannot run this engine (see how)
    probed: bool = True              # False: a profile's binary: that was not run (validate/plan/render)

    def describe(self) -> str:
        return f"{self.path} ({self.how})" if self.path else self.how


@dataclass
class Facts:
    """Everything the pure planner needs from the outside world, gathered once."""

    gpu: Gpu
    gpu_reason: str
    gpu_count: int
    models: dict[str, ModelFacts]          # by server name
    drafts: dict[str, ModelFacts]
    environ: dict[str, str]
    state_dir: str
    host_ram_bytes: int | None = None   # this machine's RAM (fit on CPU); None when not detected
    versions: dict[str, EngineVersion] = field(default_factory=dict)  # targeted engine version by server
    executables: dict[str, Located] = field(default_factory=dict)  # what up would run, by server (process)
    looked_up: bool = True              # engines and hardware were looked up (off for golden files)
    locks: dict[str, LockedServer] = field(default_factory=dict)  # the profile's lock file, by server


@dataclass(frozen=True)
class LockedServer:
    """What the lock file beside the profile says for one server, checked against what is here now
    (facts/lock.py). The planner applies `tuned` and `image` only when `drift` is empty."""

    file: str                                        # the lock file
    tuned: tuple[tuple[str, str | None], ...] = ()   # (flag, value) the tuning chose, differing from the rules
    tuned_why: str = ""                              # "tuned: +12% tok/s (workload), measured …"
    image: str | None = None                         # the image pinned by digest (repo@sha256:…)
    drift: tuple[str, ...] = ()                      # what no longer matches, each named precisely
    notes: tuple[str, ...] = ()                      # read leniently: unknown keys, a newer lock version
