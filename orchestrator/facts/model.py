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
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.facts.catalog_facts import BITS_PER_WEIGHT, from_catalog
from orchestrator.facts.types import ModelFacts
from orchestrator.paths import file_cache, write_private

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
FACTS_FORMAT = 5  # bump when read_gguf_header's output changes (invalidates the facts cache)




MAX_DIMS = 8              # GGML_MAX_DIMS is 4
# Counts the header states that the planner loops over or multiplies: bounded by what the file holds.
_LAYER_KEYS = (".block_count", ".nextn_predict_layers", ".leading_dense_block_count")
_COUNT_KEYS = (".expert_count", ".expert_used_count", ".attention.head_count", ".attention.head_count_kv",
               ".embedding_length", ".feed_forward_length", ".expert_feed_forward_length",
               ".attention.key_length", ".attention.value_length", ".attention.kv_lora_rank",
               ".rope.dimension_count", ".vocab_size", ".ssm.inner_size", ".ssm.state_size", ".ssm.conv_kernel",
               ".ssm.group_count", ".attention.sliding_window", ".shortconv.l_cache", ".full_attention_interval")
MAX_CONTEXT = 1 << 28
MAX_LAYERS = 4096         # layers a header may claim beyond its tensor count (files with facts, no weights)


class _Bounded:
    """A GGUF file read with its size in hand: no length, count or dimension read from it may ask
    for more bytes than are left (a crafted header otherwise asks for gigabytes)."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size

    def left(self) -> int:
        return self.size - self.fh.tell()

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise ValueError(f"truncated or corrupt header: {what} needs {n} bytes, {self.left()} are left")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))

    def string(self, what: str) -> bytes:
        (n,) = self.unpack("<Q", what)
        return self.read(n, what)


def _skip_or_read(r: _Bounded, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype], "a value")[0]
    if vtype == 8:
        raw = r.string("a string value")
        return raw.decode("utf-8", "replace") if keep else None
    if vtype == 9:
        itype, count = r.unpack("<IQ", "an array")
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype]) * count
            r.need(size, f"an array of {count}")
            if keep and count <= 4096:
                fmt = "<" + _SCALARS[itype][1] * count
                return list(struct.unpack(fmt, r.fh.read(size)))
            r.fh.seek(size, os.SEEK_CUR)
            return None
        r.need(8 * count, f"an array of {count}")   # each element takes at least 8 bytes
        for _ in range(count):
            _skip_or_read(r, itype, False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(ggml_type: int, n_elements: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown tensor type {ggml_type}") from None
    return n_elements // block * size


def _check_counts(out: dict[str, Any], n_tensors: int, file_size: int) -> None:
    """Counts in the header that the tensors and the file size cannot back are a corrupt file (the
    first part of a split GGUF records the tensors of all parts)."""
    split_tensors = out.get("split.tensors.count")
    if isinstance(split_tensors, int) and int(out.get("split.count") or 1) > 1:
        n_tensors = min(split_tensors, file_size)
    for key, value in out.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) for v in values):
            continue
        top = max((int(v) for v in values), default=0)
        if key.endswith(_LAYER_KEYS) and top > max(n_tensors, min(MAX_LAYERS, file_size // 32)):
            raise ValueError(f"{key} is {top}, but the file holds only {n_tensors} tensors")
        if key.endswith(_COUNT_KEYS) and top > max(file_size, 1 << 20):
            raise ValueError(f"{key} is {top}, more than a {file_size}-byte file can hold")
        if key.endswith(".context_length") and top > MAX_CONTEXT:
            raise ValueError(f"{key} is {top}")


def _read_kv(r: _Bounded, n_kv: int, out: dict[str, Any]) -> None:
    for _ in range(n_kv):
        key = r.string("a key").decode("utf-8", "replace")
        (vtype,) = r.unpack("<I", "a value type")
        if key == "tokenizer.ggml.tokens" and vtype == 9:
            pos = r.fh.tell()
            out["tokenizer.tokens_count"] = r.unpack("<IQ", "the token list")[1]
            r.fh.seek(pos)
        keep = key.startswith("general.") or key.startswith("split.") or any(key.endswith(s) for s in _NEEDED)
        value = _skip_or_read(r, vtype, keep)
        if keep and value is not None:
            out[key] = value


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Read the GGUF key/values the planner uses and sum the tensor bytes from the tensor infos
    (sizes per ggml type from the gguf library); token arrays are skipped, not decoded. Every
    length and count is bounded by the file's size, and the tensor data the header promises must
    be in the file. Raise ValueError if it is not a (whole) GGUF file."""
    out: dict[str, Any] = {}
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        r = _Bounded(fh, size)
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (it does not start with GGUF)")
        version, n_tensors, n_kv = r.unpack("<IQQ", "the header")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        r.need(12 * n_kv, f"{n_kv} key/values")
        _read_kv(r, n_kv, out)
        r.need(24 * n_tensors, f"{n_tensors} tensor infos")
        total = experts = embedding = 0
        data_end = 0
        has_output = False
        expert_layers: set[int] = set()
        for _ in range(n_tensors):
            name = r.string("a tensor name").decode("utf-8", "replace")
            (n_dims,) = r.unpack("<I", "a tensor's dimensions")
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name[:60]!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = r.unpack("<" + "Q" * n_dims, "a tensor's shape")
            ggml_type, offset = r.unpack("<IQ", "a tensor's type")
            n = 1
            for d in dims:
                n *= d
            nbytes = _tensor_bytes(ggml_type, n)
            total += nbytes
            data_end = max(data_end, offset + nbytes)
            if name == "token_embd.weight":
                embedding = nbytes
            elif name == "output.weight":
                has_output = True
            if "_exps" in name:
                experts += nbytes
                parts = name.split(".")
                if len(parts) > 1 and parts[1].isdigit():
                    expert_layers.add(int(parts[1]))
        align = int(out.get("general.alignment") or 32)
        data_start = -(-fh.tell() // align) * align if align > 0 else fh.tell()
        if n_tensors and data_start + data_end > size:
            raise ValueError(f"truncated: the header promises {data_start + data_end} bytes of tensor data, "
                             f"the file has {size}")
        _check_counts(out, n_tensors, size)
        out["tensors.count"] = n_tensors
        out["tensors.bytes"] = total
        out["tensors.expert_bytes"] = experts
        out["tensors.expert_layers"] = len(expert_layers)
        out["tensors.token_embd_bytes"] = embedding     # read one row per token, unless tied to the output
        out["tensors.output_tied"] = not has_output     # no output.weight: the embedding is the output matrix
    return out


def cached_gguf_header(path: Path) -> dict[str, Any]:
    """read_gguf_header, cached by (path, size, mtime): a 262k-token vocabulary takes ~0.4 s to skip."""
    cache = file_cache("modelfacts", path, FACTS_FORMAT)
    if cache is None:
        path.stat()   # the OSError saying why it cannot be read
        raise FileNotFoundError(path)
    try:
        return dict(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    header = read_gguf_header(path)
    try:
        write_private(cache, json.dumps(header))
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
    kind = _file_kind(path)
    fmt = "gguf" if kind == "file" or (kind == "missing" and stem.lower().endswith(".gguf")) else "hf"
    q = quant or infer_quant(stem)
    if kind == "missing":
        known = from_catalog(stem, fmt, str(path), q)
        if known:
            return known
    total, active = infer_params(stem)
    meta: dict[str, Any] = {}
    notes: list[str] = []
    arch = None
    defect = None if kind in ("file", "dir", "missing") else (
        f"is {kind}" if kind.startswith("a path") else f"is {kind}, not a model file")
    if kind == "file":
        try:
            header, notes = read_gguf(path)
        except (ValueError, OSError, struct.error) as exc:
            header, defect = {}, str(exc)
        arch = header.get("general.architecture")
        for key, value in header.items():
            if arch and key.startswith(arch + "."):
                meta[key[len(arch) + 1:]] = value
            elif key.startswith(("tensors.", "tokenizer.")):
                meta[key] = value
    elif kind == "dir" and (path / "config.json").exists():
        try:
            arch, meta = _hf_config(path / "config.json")
        except ValueError as exc:
            defect = f"config.json: {exc}"
    return _facts(path, kind, fmt, q, total, active, arch, meta, notes, defect)


def _file_kind(path: Path) -> str:
    """file | dir | missing, or what else it is (a FIFO is never opened: reading one blocks)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return f"a path that cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"


# HF config fields the planner multiplies or loops over, with the largest value a real model has
# (and then some): a config beyond them is corrupt or crafted.
_HF_LIMITS = {"num_hidden_layers": 4096, "max_position_embeddings": MAX_CONTEXT, "num_attention_heads": 1 << 14,
              "num_key_value_heads": 1 << 14, "head_dim": 1 << 14, "hidden_size": 1 << 20,
              "intermediate_size": 1 << 22, "sliding_window": MAX_CONTEXT, "num_experts": 1 << 16,
              "num_local_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "vocab_size": 1 << 24,
              "full_attention_interval": 4096, "conv_L_cache": 1 << 16, "linear_num_value_heads": 1 << 14,
              "linear_value_head_dim": 1 << 14, "linear_key_head_dim": 1 << 14, "linear_num_key_heads": 1 << 14,
              "linear_conv_kernel_dim": 1 << 10}


def _hf_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's section of an HF config, every count checked against _HF_LIMITS."""
    text = cfg.get("text_config") or cfg
    if not isinstance(text, dict):
        raise ValueError("text_config is not a mapping")
    for key, limit in _HF_LIMITS.items():
        value = text.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"{key} is {str(value)[:40]!r}, not a count up to {limit}")
    kinds = text.get("layer_types")
    if kinds is not None and not (isinstance(kinds, list) and len(kinds) <= 4096
                                  and all(isinstance(k, str) for k in kinds)):
        raise ValueError("layer_types is not a list of layer names")
    return text


def _hf_config(config: Path) -> tuple[str | None, dict[str, Any]]:
    """(architecture, facts in GGUF key names) from an HF config.json; ValueError names what is wrong."""
    try:
        cfg = json.loads(config.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(cfg, dict):
        raise ValueError("not a JSON object")
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    text = _hf_section(cfg)
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if heads and hidden else None)
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
        # transformers 5 writes "dtype"; earlier versions "torch_dtype"
        "torch_dtype": (text.get("torch_dtype") or cfg.get("torch_dtype") or text.get("dtype")
                        or cfg.get("dtype")),
        "quant_method": (cfg.get("quantization_config") or {}).get("quant_method") if isinstance(
            cfg.get("quantization_config"), dict) else None,
        "full_attention_interval": text.get("full_attention_interval"),
        "shortconv.l_cache": text.get("conv_L_cache"),
    }.items() if v is not None}
    meta.update(_hf_hybrid(text, meta))
    return arch, meta


HF_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _facts(path: Path, kind: str, fmt: str, q: str | None, total: float | None, active: float | None,
           arch: str | None, meta: dict[str, Any], notes: list[str], defect: str | None) -> ModelFacts:
    stem = path.name
    exists = kind in ("file", "dir")
    if meta.get("tensors.bytes"):
        size: int | None = int(meta["tensors.bytes"])
        estimate = False
    elif kind == "file":
        size = path.stat().st_size
        estimate = False
    elif kind == "dir":
        weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        size = weights or _index_total(path)
        estimate = size is None
        width = HF_DTYPE_BYTES.get(str(meta.get("torch_dtype")))
        if total is None and width and weights and not meta.get("quant_method"):
            total = round(weights / width / 1e9, 6)   # safetensors hold the weights at the config's dtype
            notes = [*notes, f"{total:.3g}B parameters: the safetensors' {weights:,} bytes at {width} bytes per "
                             f"{meta['torch_dtype']} weight"]
    else:
        size, estimate = _estimate_bytes(total, q), True
    nextn = meta.get("nextn_predict_layers")
    return ModelFacts(
        name=stem, format=fmt, location=str(path), exists=exists, quant=q,
        params_b=total, active_params_b=active, size_bytes=size, size_is_estimate=estimate,
        arch=arch, n_layers=meta.get("block_count"), trained_context=meta.get("context_length"),
        has_mtp=(bool(nextn) if arch else None), metadata=meta,
        source="file" if exists else "name", notes=tuple(notes), defect=defect,
    )
