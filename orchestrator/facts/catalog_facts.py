"""ModelFacts from the model catalog (catalog/models.yaml) alone: no file is read, so the planner's
callers that rank the whole catalog (orchestrator.recommend) can build them without I/O. facts.model
falls back to these when the model file is not on this machine."""

from __future__ import annotations

from typing import Any

from orchestrator.catalog import ModelEntry, find_model
from orchestrator.facts.types import ModelFacts

# Bits per weight by quant label (llama.cpp's quantize table and published GGUF sizes, rounded).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_K_XL": 4.9, "Q4_0": 4.5, "IQ4_XS": 4.25,
    "IQ4_NL": 4.5, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q3_K_L": 4.27, "Q3_K_XL": 4.1, "IQ3_M": 3.66,
    "IQ3_XXS": 3.06, "Q2_K": 3.35, "Q2_K_XL": 3.0, "IQ2_M": 2.7, "IQ2_XXS": 2.06, "IQ1_S": 1.56,
    "FP8": 8.0, "AWQ": 4.25, "GPTQ": 4.25, "NVFP4": 4.5, "MXFP4": 4.25,
}


def from_catalog(name: str, fmt: str, location: str, quant: str | None, lookup: str = "") -> ModelFacts | None:
    """Facts of the catalog entry whose match fragment occurs in lookup (or name), or None."""
    entry = find_model(lookup or name)
    if entry is None:
        return None
    return entry_facts(entry, quant, fmt, name, location)


def entry_facts(entry: ModelEntry, quant: str | None, fmt: str = "gguf", name: str = "",
                location: str = "") -> ModelFacts:
    """One catalog entry at one quant: published file size where the catalog has it, else
    parameters x bits per weight (the notes say which)."""
    name = name or (f"{entry.name}-{quant}" if quant else entry.name)
    meta: dict[str, Any] = dict(entry.metadata)
    meta.setdefault("context_length", None)
    published = entry.files.get((quant or "").upper()) if fmt == "gguf" else None
    if published:
        size = published
        how = f"published {quant} file size"
    else:
        bits = BITS_PER_WEIGHT.get((quant or "").upper(), 16.0)
        size = int(entry.params_b * 1e9 * bits / 8)
        how = f"{entry.params_b:g}B parameters x {bits:g} bits ({quant or 'bf16'})"
    if meta.get("expert_count") and meta.get("expert_feed_forward_length") and meta.get("embedding_length"):
        layers = int(meta["block_count"]) - int(meta.get("leading_dense_block_count") or 0)
        expert_params = 3 * int(meta["embedding_length"]) * int(meta["expert_feed_forward_length"]) \
            * int(meta["expert_count"]) * layers
        meta["tensors.expert_bytes"] = int(size * min(expert_params / (entry.params_b * 1e9), 1.0))
        meta["tensors.expert_layers"] = layers
    notes = [f"estimated from catalog: {entry.name} ({how}); source: {entry.source}",
             *(f"assumed: {a}" for a in entry.assumed)]
    return ModelFacts(
        name=name, format=fmt, location=location, exists=False, quant=quant, params_b=entry.params_b,
        active_params_b=entry.active_params_b or entry.params_b, size_bytes=size, size_is_estimate=True,
        arch=entry.arch, n_layers=int(meta["block_count"]), trained_context=meta.get("context_length"),
        has_mtp=None, metadata={k: v for k, v in meta.items() if v is not None}, source="catalog", notes=tuple(notes))


