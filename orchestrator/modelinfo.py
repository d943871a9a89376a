"""ModelFacts: what the planner needs to know about a model, gathered once before planning.

From a local GGUF file we read only the header key/values (token arrays are
skipped, not decoded). Without the file (profiles are written on a laptop and
served elsewhere) facts are inferred from the name and marked as estimates.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# Bits per weight by quant label (llama.cpp's quantize table and published GGUF sizes, rounded).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_K_XL": 4.9, "Q4_0": 4.5, "IQ4_XS": 4.25,
    "IQ4_NL": 4.5, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q3_K_L": 4.27, "Q3_K_XL": 4.1, "IQ3_M": 3.66,
    "IQ3_XXS": 3.06, "Q2_K": 3.35, "Q2_K_XL": 3.0, "IQ2_M": 2.7, "IQ2_XXS": 2.06, "IQ1_S": 1.56,
    "FP8": 8.0, "AWQ": 4.25, "GPTQ": 4.25, "NVFP4": 4.5, "MXFP4": 4.25,
}
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:UD-)?(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|FP8|AWQ|GPTQ|NVFP4|MXFP4)(?![A-Za-z0-9])",
    re.IGNORECASE)
_PARAMS_RE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")
_ACTIVE_RE = re.compile(r"(?<![A-Za-z0-9])A(\d+(?:\.\d+)?)B(?![A-Za-z0-9])")
# GGUF metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NEEDED = ("general.architecture", "general.name", "general.file_type", "general.size_label",
           ".block_count", ".context_length", ".embedding_length", ".attention.head_count",
           ".attention.head_count_kv", ".attention.key_length", ".attention.value_length",
           ".expert_count", ".expert_used_count", ".nextn_predict_layers", ".attention.sliding_window",
           ".feed_forward_length", ".attention.kv_lora_rank", ".rope.dimension_count", ".vocab_size",
           ".attention.sliding_window_pattern")
FACTS_FORMAT = 2  # bump when read_gguf_header's output changes (invalidates the facts cache)


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

    @property
    def is_moe(self) -> bool:
        if self.metadata.get("expert_count"):
            return True
        return bool(self.params_b and self.active_params_b and self.active_params_b < self.params_b)

    @property
    def size_gib(self) -> float | None:
        return self.size_bytes / 2**30 if self.size_bytes else None


def _read_str(fh: BinaryIO) -> bytes:
    (n,) = struct.unpack("<Q", fh.read(8))
    return fh.read(n)


def _skip_or_read(fh: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if vtype == 8:
        raw = _read_str(fh)
        return raw.decode("utf-8", "replace") if keep else None
    if vtype == 9:
        itype, count = struct.unpack("<IQ", fh.read(12))
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype]) * count
            if keep and count <= 4096:
                fmt = "<" + _SCALARS[itype][1] * count
                return list(struct.unpack(fmt, fh.read(size)))
            fh.seek(size, os.SEEK_CUR)
            return None
        for _ in range(count):
            _skip_or_read(fh, itype, False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(ggml_type: int, n_elements: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return n_elements // block * size


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Read the GGUF key/values the planner uses and sum the tensor bytes from the tensor infos
    (sizes per ggml type from the gguf library); token arrays are skipped, not decoded.
    Raise ValueError if not a GGUF file."""
    out: dict[str, Any] = {}
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        for _ in range(n_kv):
            key = _read_str(fh).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", fh.read(4))
            if key == "tokenizer.ggml.tokens" and vtype == 9:
                pos = fh.tell()
                out["tokenizer.tokens_count"] = struct.unpack("<IQ", fh.read(12))[1]
                fh.seek(pos)
            keep = key.startswith("general.") or key.startswith("split.") or any(key.endswith(s) for s in _NEEDED)
            value = _skip_or_read(fh, vtype, keep)
            if keep and value is not None:
                out[key] = value
        total = experts = 0
        expert_layers: set[int] = set()
        for _ in range(n_tensors):
            name = _read_str(fh).decode("utf-8", "replace")
            (n_dims,) = struct.unpack("<I", fh.read(4))
            dims = struct.unpack("<" + "Q" * n_dims, fh.read(8 * n_dims))
            ggml_type, _offset = struct.unpack("<IQ", fh.read(12))
            n = 1
            for d in dims:
                n *= d
            nbytes = _tensor_bytes(ggml_type, n)
            total += nbytes
            if "_exps" in name:
                experts += nbytes
                parts = name.split(".")
                if len(parts) > 1 and parts[1].isdigit():
                    expert_layers.add(int(parts[1]))
        out["tensors.count"] = n_tensors
        out["tensors.bytes"] = total
        out["tensors.expert_bytes"] = experts
        out["tensors.expert_layers"] = len(expert_layers)
    return out


def _facts_cache_dir() -> Path:
    base = os.environ.get("ORCHESTRATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrator")
    return Path(base) / "modelfacts"


def cached_gguf_header(path: Path) -> dict[str, Any]:
    """read_gguf_header, cached by (path, size, mtime): a 262k-token vocabulary takes ~0.4 s to skip."""
    import hashlib

    st = path.stat()
    stamp = f"{FACTS_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:32]
    cache = _facts_cache_dir() / f"{key}.json"
    try:
        return dict(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    header = read_gguf_header(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(header))
        tmp.replace(cache)
    except OSError:
        pass
    return header


def infer_quant(name: str) -> str | None:
    m = _QUANT_RE.search(name)
    return m.group(1).upper() if m else None


def infer_params(name: str) -> tuple[float | None, float | None]:
    total = None
    for m in _PARAMS_RE.finditer(name):
        value = float(m.group(1)) * (1e-3 if m.group(2).lower() == "m" else 1.0)
        prefix = name[max(0, m.start() - 1):m.start()]
        if prefix.upper() == "A":
            continue
        total = value
        break
    active = _ACTIVE_RE.search(name)
    act = float(active.group(1)) if active else total
    return total, act


def _estimate_bytes(params_b: float | None, quant: str | None) -> int | None:
    if params_b is None:
        return None
    bits = BITS_PER_WEIGHT.get((quant or "").upper(), 16.0)
    return int(params_b * 1e9 * bits / 8)


def gather(location: str, quant: str | None = None, is_hf: bool = False) -> ModelFacts:
    """Collect facts for a model path (expanded) or hf reference. Never raises for a missing file."""
    if is_hf:
        repo, _, sel = location.partition(":")
        label = sel or repo.split("/")[-1]
        fmt = "gguf" if (sel.lower().endswith(".gguf") or "gguf" in repo.lower()) else "hf"
        q = quant or infer_quant(label) or infer_quant(repo)
        total, active = infer_params(repo)
        return ModelFacts(label, fmt, location, False, q, total, active, _estimate_bytes(active and total, q), True)
    path = Path(location)
    stem = path.name
    fmt = "hf" if (path.is_dir() or not stem.lower().endswith(".gguf")) else "gguf"
    q = quant or infer_quant(stem)
    total, active = infer_params(stem)
    meta: dict[str, Any] = {}
    arch = None
    if fmt == "gguf" and path.is_file():
        try:
            header = cached_gguf_header(path)
        except (ValueError, OSError, struct.error):
            header = {}
        arch = header.get("general.architecture")
        for key, value in header.items():
            if arch and key.startswith(arch + "."):
                meta[key[len(arch) + 1:]] = value
            elif key.startswith(("tensors.", "tokenizer.")):
                meta[key] = value
    elif fmt == "hf" and (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        arch = (cfg.get("architectures") or [None])[0]
        text = cfg.get("text_config") or cfg
        heads = text.get("num_attention_heads")
        head_dim = text.get("head_dim") or (text.get("hidden_size") // heads if heads else None)
        meta = {k: v for k, v in {
            "block_count": text.get("num_hidden_layers"),
            "context_length": text.get("max_position_embeddings"),
            "attention.head_count": heads,
            "attention.head_count_kv": text.get("num_key_value_heads", heads),
            "attention.key_length": head_dim,
            "attention.value_length": head_dim,
            "embedding_length": text.get("hidden_size"),
            "feed_forward_length": text.get("intermediate_size"),
            "attention.sliding_window": text.get("sliding_window") if text.get("use_sliding_window", True) else None,
            "expert_count": text.get("num_experts") or text.get("num_local_experts"),
            "expert_used_count": text.get("num_experts_per_tok"),
            "tokenizer.tokens_count": text.get("vocab_size"),
            "torch_dtype": text.get("torch_dtype") or cfg.get("torch_dtype"),
        }.items() if v is not None}
    if meta.get("tensors.bytes"):
        size: int | None = int(meta["tensors.bytes"])
        estimate = False
    elif path.is_file():
        size = path.stat().st_size
        estimate = False
    elif path.is_dir():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) or None
        estimate = size is None
    else:
        size, estimate = _estimate_bytes(total, q), True
    nextn = meta.get("nextn_predict_layers")
    return ModelFacts(
        name=stem, format=fmt, location=str(path), exists=path.exists(), quant=q,
        params_b=total, active_params_b=active, size_bytes=size, size_is_estimate=estimate,
        arch=arch, n_layers=meta.get("block_count"), trained_context=meta.get("context_length"),
        has_mtp=(bool(nextn) if arch else None), metadata=meta,
    )
