"""ModelFacts: what the planner needs to know about a model, gathered once before planning.

From a local GGUF file (all parts of a split GGUF) we read only the header key/values and the
tensor table (token arrays are skipped, not decoded). Without the file (profiles are written on a
laptop and served elsewhere) facts come from the model catalog (catalog/models.yaml) when it knows
the model, else from the name, and are marked as estimates.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.facts.catalog_facts import BITS_PER_WEIGHT, from_catalog
from orchestrator.facts.types import ModelFacts
from orchestrator.paths import cache_dir

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
           ".attention.sliding_window_pattern", ".full_attention_interval", ".attention.recurrent_layers",
           ".ssm.conv_kernel", ".ssm.inner_size", ".ssm.state_size", ".ssm.group_count", ".shortconv.l_cache",
           ".expert_feed_forward_length", ".leading_dense_block_count")
FACTS_FORMAT = 4  # bump when read_gguf_header's output changes (invalidates the facts cache)




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
        total = experts = embedding = 0
        has_output = False
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
            if name == "token_embd.weight":
                embedding = nbytes
            elif name == "output.weight":
                has_output = True
            if "_exps" in name:
                experts += nbytes
                parts = name.split(".")
                if len(parts) > 1 and parts[1].isdigit():
                    expert_layers.add(int(parts[1]))
        out["tensors.count"] = n_tensors
        out["tensors.bytes"] = total
        out["tensors.expert_bytes"] = experts
        out["tensors.expert_layers"] = len(expert_layers)
        out["tensors.token_embd_bytes"] = embedding     # read one row per token, unless tied to the output
        out["tensors.output_tied"] = not has_output     # no output.weight: the embedding is the output matrix
    return out


def cached_gguf_header(path: Path) -> dict[str, Any]:
    """read_gguf_header, cached by (path, size, mtime): a 262k-token vocabulary takes ~0.4 s to skip."""
    import hashlib

    st = path.stat()
    stamp = f"{FACTS_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:32]
    cache = cache_dir("modelfacts") / f"{key}.json"
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


# HF layer_types entries whose layers hold no KV cache (recurrent or convolution state instead).
_STATE_LAYERS = {"linear_attention", "conv", "mamba", "mamba2", "recurrent", "short_conv"}


def _hf_hybrid(text: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Hybrid (linear-attention / convolution) layer facts from an HF config, in GGUF key names."""
    out: dict[str, Any] = {}
    kinds = text.get("layer_types")
    n_kv = meta.get("attention.head_count_kv")
    if isinstance(kinds, list) and isinstance(n_kv, int) and any(k in _STATE_LAYERS for k in kinds):
        out["attention.head_count_kv"] = [0 if k in _STATE_LAYERS else n_kv for k in kinds]
    if text.get("linear_num_value_heads") and text.get("linear_value_head_dim"):
        out["ssm.inner_size"] = int(text["linear_num_value_heads"]) * int(text["linear_value_head_dim"])
        out["ssm.state_size"] = int(text.get("linear_key_head_dim") or text["linear_value_head_dim"])
        out["ssm.group_count"] = int(text.get("linear_num_key_heads") or 1)
        out["ssm.conv_kernel"] = int(text.get("linear_conv_kernel_dim") or 4)
    return out


def _index_total(path: Path) -> int | None:
    """Total weight bytes from model.safetensors.index.json when the shards are not (all) here."""
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        return int(index["metadata"]["total_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF (model-00001-of-00003.gguf ...), or [path] for a single file."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_gguf(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The header of a GGUF file, with the tensor totals of every part when it is split; and notes."""
    parts = split_parts(path)
    first = parts[0]
    header = cached_gguf_header(first if first.is_file() else path)
    if len(parts) == 1:
        return header, []
    missing = [p.name for p in parts if not p.is_file()]
    totals = {"tensors.count": 0, "tensors.bytes": 0, "tensors.expert_bytes": 0, "tensors.token_embd_bytes": 0}
    layers = 0
    tied = True
    for part in parts:
        if part.is_file():
            h = cached_gguf_header(part)
            for key in totals:
                totals[key] += int(h.get(key) or 0)
            layers = max(layers, int(h.get("tensors.expert_layers") or 0))
            tied = tied and h.get("tensors.output_tied", True)
    header = {**header, **totals, "tensors.expert_layers": layers, "tensors.output_tied": tied,
              "split.parts": len(parts)}
    notes = [f"split GGUF: {len(parts)} parts" + (f"; missing {', '.join(missing)} (their tensors are not counted)"
                                                 if missing else "")]
    return header, notes


def gather(location: str, quant: str | None = None, is_hf: bool = False) -> ModelFacts:
    """Collect facts for a model path (expanded) or hf reference. Never raises for a missing file."""
    if is_hf:
        repo, _, sel = location.partition(":")
        label = sel or repo.split("/")[-1]
        fmt = "gguf" if (sel.lower().endswith(".gguf") or "gguf" in repo.lower()) else "hf"
        q = quant or infer_quant(label) or infer_quant(repo)
        known = from_catalog(label, fmt, location, q, lookup=f"{repo} {label}")
        if known:
            return known
        total, active = infer_params(repo)
        return ModelFacts(label, fmt, location, False, q, total, active, _estimate_bytes(active and total, q), True,
                          source="name")
    path = Path(location)
    stem = path.name
    fmt = "hf" if (path.is_dir() or not stem.lower().endswith(".gguf")) else "gguf"
    q = quant or infer_quant(stem)
    if not path.exists():
        known = from_catalog(stem, fmt, str(path), q)
        if known:
            return known
    total, active = infer_params(stem)
    meta: dict[str, Any] = {}
    notes: list[str] = []
    arch = None
    if fmt == "gguf" and path.is_file():
        try:
            header, notes = read_gguf(path)
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
            "full_attention_interval": text.get("full_attention_interval"),
            "shortconv.l_cache": text.get("conv_L_cache"),
        }.items() if v is not None}
        meta.update(_hf_hybrid(text, meta))
    if meta.get("tensors.bytes"):
        size: int | None = int(meta["tensors.bytes"])
        estimate = False
    elif path.is_file():
        size = path.stat().st_size
        estimate = False
    elif path.is_dir():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) or _index_total(path)
        estimate = size is None
    else:
        size, estimate = _estimate_bytes(total, q), True
    nextn = meta.get("nextn_predict_layers")
    return ModelFacts(
        name=stem, format=fmt, location=str(path), exists=path.exists(), quant=q,
        params_b=total, active_params_b=active, size_bytes=size, size_is_estimate=estimate,
        arch=arch, n_layers=meta.get("block_count"), trained_context=meta.get("context_length"),
        has_mtp=(bool(nextn) if arch else None), metadata=meta,
        source="file" if path.exists() else "name", notes=tuple(notes),
    )
