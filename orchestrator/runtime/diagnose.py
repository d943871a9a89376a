"""Classify why a server failed from the tail of its log, with a concrete fix."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# (class, pattern, hint) — first match wins, so the most specific patterns come first.
PATTERNS: list[tuple[str, str, str]] = [
    ("bad_flag", r"invalid argument|unknown argument|unrecognized arguments|error while handling argument|"
                 r"has been removed|failed to parse arguments|error: ambiguous option|error: argument --",
     "the engine rejected an argument: check extra_args and that the installed engine is the version the plan "
     "targets (orchestrate plan names it; orchestrate engines list shows what is installed)"),
    ("gpu_oom", r"cudamalloc failed: out of memory|cuda out of memory|unable to allocate cuda\d* buffer|"
                r"torch\.outofmemoryerror|out of device memory|failed to allocate .* buffer",
     "the model does not fit in GPU memory: lower context or parallel, use kv_cache q8_0, a smaller quant, or "
     "offload: auto"),
    ("host_oom", r"std::bad_alloc|cannot allocate memory|killed process|failed to mmap|mmap failed",
     "not enough system memory: lower context/parallel, close other programs, or use a smaller quant"),
    ("kv_cache_oom", r"no available memory for the cache blocks|insufficient.*kv cache|"
                     r"less than requested memory for kv|larger than the available kv cache memory",
     "the KV cache does not fit: lower context or parallel, or raise the memory fraction"),
    ("port_in_use", r"address already in use|couldn't bind http server socket|eaddrinuse|failed to bind",
     "another process holds the port: stop it or change port: in the profile"),
    ("engine_missing", r"no module named '?(vllm|sglang)\b",
     "the Python that runs the engine cannot import it: orchestrate engines install vllm (CPU), or point "
     "binary: at the Python of a venv that has the engine"),
    ("model_corrupt", r"tensor .* data is not within the file bounds|failed to read magic|invalid magic|"
                      r"not a gguf file|corrupted|unexpectedly reached end of file|gguf_init_from_file",
     "the model file is truncated or not a GGUF file: download it again and compare its size/checksum"),
    ("model_missing", r"no such file or directory|failed to load model|does not appear to have a file named|"
                      r"repository not found|401 client error|gatedrepoerror",
     "check model.path (it must exist on this machine) or model.hf and your token"),
    ("arch_unsupported", r"no kernel image is available|is not compatible with the current pytorch|"
                         r"only supports ampere|unsupported gpu architecture|compute capability",
     "this build has no kernels for the GPU: build the engine for its architecture "
     "(orchestrate engines install ... --gpu-arch) or pick another engine"),
    ("engine_too_old", r"unknown model architecture|unknown \(differs\) arch",
     "the engine is older than the model format: install a newer engine build"),
    ("gpu_runtime", r"could not select device driver|failed to initialize nvml|no cuda-capable device",
     "the GPU is not visible: check the driver and, for containers, the NVIDIA container toolkit"),
    ("nccl_shm", r"error while creating shared memory segment|ncclshmopen|nccl error",
     "multi-GPU needs more /dev/shm: the rendered compose/k8s set it; for docker run add --shm-size 16g"),
    ("remote_code", r"requires you to execute the configuration file|trust_remote_code",
     "the model ships custom code: set model.trust_remote_code: true if you trust it"),
    ("illegal_instruction", r"illegal instruction|sigill",
     "the binary was built for a newer CPU: rebuild it on this machine (orchestrate engines install)"),
]


@lru_cache(maxsize=1)
def _compiled() -> list[tuple[str, re.Pattern[str], str]]:
    """Compiled on the first failure to classify, not at import: `up` imports this before the spawn."""
    return [(c, re.compile(p, re.IGNORECASE), h) for c, p, h in PATTERNS]


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    hint: str
    line: str | None   # the log line that matched

    def __str__(self) -> str:
        return f"{self.cause}: {self.hint}"


def classify(log_tail: str, returncode: int | None = None) -> Diagnosis:
    lines = log_tail.splitlines()[-200:]
    for cause, rx, hint in _compiled():
        for line in lines:
            if rx.search(line):
                return Diagnosis(cause, hint, line.strip())
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == 9:
            return Diagnosis("killed", "killed by SIGKILL: often the kernel OOM killer (check dmesg) — lower memory use", None)
        if sig == 4:
            return Diagnosis("illegal_instruction", dict((c, h) for c, _, h in PATTERNS)["illegal_instruction"], None)
        return Diagnosis("crashed", f"the engine died from signal {sig}: see the log tail", None)
    return Diagnosis("unknown", "see the log tail above", None)
