"""What a GPU can run, how fast, ranked for a use. For each catalog model x quant this builds the
profile a user would write, plans it with the planner (its engine, flags, offload and memory
estimate: the same fit model `plan` and `fit` use) and predicts batch-1 speed from the plan with
plan.speed. Pure: the caller passes the GPU, the host's figures and the calibration it measured or
read; nothing here opens a file, a socket or a process."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from orchestrator import catalog
from orchestrator.catalog import Gpu, ModelEntry
from orchestrator.errors import ProfileError
from orchestrator.facts.catalog_facts import entry_facts
from orchestrator.facts.types import Facts
from orchestrator.plan.model import GIB, ServerPlan
from orchestrator.plan.planner import plan
from orchestrator.plan.speed import Efficiency, Host, Speed, default_efficiency, predict
from orchestrator.profile import load_text

# The K-quant ladder GGUF publishers ship for nearly every model (llama.cpp's quantize presets);
# a catalog entry's published files add their own labels (e.g. Unsloth's UD-Q4_K_XL).
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
# Quality bands by perplexity increase on Llama-3-8B: up to Q4_K_M (+0.18) small, up to Q4_0 (+0.47)
# moderate, beyond (Q3_K_M +0.66, Q2_K +3.5) heavy. Within a band speed decides, not the last 0.1 ppl.
SMALL_LOSS_PPL = 0.2
HEAVY_LOSS_PPL = 0.5
VERDICT_ORDER = {"fits": 0, "fits with offload": 1, "unknown": 2, "does not fit": 3}
# Flags that say nothing about the placement or speed of the model (names, addresses, metrics).
_QUIET_FLAGS = {"", "-m", "-a", "--host", "--port", "-np", "--metrics", "--fit", "--api-key-file", "--api-key",
                "--jinja", "--slot-save-path", "--no-webui", "-hf", "--hf-file"}


@dataclass(frozen=True)
class Use:
    name: str
    context: int                  # default --context for this use
    min_decode: float             # tok/s a row needs to count as usable for it
    min_prefill: float
    why: str


USES: dict[str, Use] = {
    "chat": Use("chat", 8192, 10, 100,
                "chat: decode of at least 10 tok/s (faster than reading), then the largest model at the least "
                "lossy quant"),
    "code": Use("code", 32768, 20, 300,
                "code: decode of at least 20 tok/s and prefill of at least 300 tok/s (files and diffs are long "
                "prompts); coder models first, then the largest at the least lossy quant"),
    "agent": Use("agent", 32768, 15, 500,
                 "agent: prefill of at least 500 tok/s (every tool call resends a long prompt) and decode of at "
                 "least 15 tok/s; then the largest model at the least lossy quant"),
    "long-context": Use("long-context", 131072, 5, 200,
                        "long-context: the model must be trained for the context asked; prefill of at least 200 "
                        "tok/s (a long prompt takes minutes below that) and decode of at least 5 tok/s; then the "
                        "largest model at the least lossy quant"),
}


@dataclass
class Row:
    model: str
    quant: str
    verdict: str                  # fits | fits with offload | does not fit | unknown
    engine: str | None
    flags: str                    # the plan's placement and speed flags, as argv
    memory: str                   # the fit estimate in one line
    device_gib: float | None
    host_gib: float
    speed: Speed | None
    quality: str                  # the quant's perplexity cost where known
    ppl_delta: float | None
    dense_equiv_b: float          # model size for ranking: sqrt(total x active) for MoE
    coder: bool
    trained_context: int | None
    profile_yaml: str
    problems: list[str] = field(default_factory=list)
    meets: bool = False
    reason: str = ""
    rank: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speed"] = self.speed.as_dict() if self.speed else None
        return d


def quants_for(entry: ModelEntry) -> list[str]:
    if entry.quants:
        return list(entry.quants)
    out = list(QUANT_LADDER)
    for label in entry.files:
        if label not in out:
            out.append(label)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "model"


def profile_text(entry: ModelEntry, quant: str, gpu: Gpu, count: int, context: int,
                 models_dir: str = "~/models") -> str:
    """The profile this row stands for: what `--write` saves. The model path is where the GGUF is
    expected; until it is there, plan and fit read the model's shape from the catalog."""
    doc = {
        # deployment--server names containers, k8s objects and logs: within 63 (31 + 2 + 30)
        "name": _slug(f"{entry.name}-{quant}")[:31].strip("-"),
        "hardware": {"gpu": gpu.id, "count": count if not gpu.is_cpu else 1},
        "servers": [{
            "name": _slug(entry.name)[:30].strip("-"),
            "engine": "auto",
            "model": {"path": f"{models_dir}/{entry.name}-{quant}.gguf", "quant": quant},
            "context": context,
            "parallel": 1,
        }],
    }
    head = (f"# {entry.name} {quant} on {count if not gpu.is_cpu else ''}{'x ' if not gpu.is_cpu else ''}{gpu.name},"
            f" written by `orchestrate recommend`.\n# Put the GGUF at the model path (or change it), then: "
            f"orchestrate plan THIS.yaml\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def _key_flags(sp: ServerPlan) -> str:
    return " ".join(" ".join(f.argv()) for f in sp.flags if f.name not in _QUIET_FLAGS and f.source != "user")


def dense_equivalent(entry: ModelEntry) -> float:
    """A MoE model's size for ranking: the geometric mean of total and active parameters (a rule of
    thumb for comparing MoE with dense models, not a measurement)."""
    if entry.active_params_b and entry.active_params_b < entry.params_b:
        return round(math.sqrt(entry.params_b * entry.active_params_b), 1)
    return entry.params_b


def evaluate(entry: ModelEntry, quant: str, gpu: Gpu, count: int, context: int, host: Host,
             host_ram_bytes: int | None, efficiencies: dict[str, Efficiency] | None = None,
             prompt_tokens: int = 512) -> Row:
    """Plan one model x quant for the GPU and predict its speed. efficiencies: per engine, what
    calibration found (missing engines get the default for their backend)."""
    text = profile_text(entry, quant, gpu, count, context)
    loaded = load_text(text, f"<{entry.name} {quant}>")
    server = loaded.profile.servers[0]
    mf = entry_facts(entry, quant, "gguf", name=f"{entry.name}-{quant}.gguf", location=str(server.model.path))
    facts = Facts(gpu=gpu, gpu_reason=f"recommend --gpu {gpu.id}", gpu_count=0 if gpu.is_cpu else count,
                  models={server.name: mf}, drafts={}, environ={}, state_dir="", host_ram_bytes=host_ram_bytes,
                  looked_up=False)
    qq = catalog.quant_quality(quant)
    row = Row(entry.name, quant, "does not fit", None, "", "", None, 0.0, None,
              qq.describe() if qq else f"not known for {quant} (llama.cpp's quantize table gives no figure)",
              qq.ppl_delta if qq else None, dense_equivalent(entry), "coder" in entry.name.lower(),
              mf.trained_context, text)
    try:
        planned = plan(loaded, facts, enforce_fit=False)
    except ProfileError as exc:
        row.problems = [p.message + (f" — {p.hint}" if p.hint else "") for p in exc.problems]
        row.memory = "not planned: " + "; ".join(row.problems)
        return row
    sp = planned.servers[0]
    est = sp.estimate
    row.engine = sp.engine
    row.flags = _key_flags(sp)
    if est is not None:
        row.verdict = est.verdict
        row.memory = est.summary()
        row.device_gib = round(est.total_bytes / GIB, 2)
        row.host_gib = round(est.host_bytes / GIB, 2)
        if est.host_bytes and host_ram_bytes and est.host_bytes > host_ram_bytes * 0.9:
            row.verdict = "does not fit"
            row.problems.append(f"{est.host_bytes / GIB:.1f} GiB of weights in system RAM exceed 90% of "
                                f"{host_ram_bytes / GIB:.0f} GiB")
            row.memory = f"does not fit: {row.problems[-1]} ({row.memory})"
    eff = (efficiencies or {}).get(sp.engine) or default_efficiency(sp.engine, gpu.accelerator)
    kv = sp.settings.kv_cache if sp.settings else "f16"
    row.speed = predict(mf, gpu, max(count, 1), sp.engine, kv, host, eff, prompt_tokens,
                        est.host_bytes if est else 0, sp.settings.offload if sp.settings else "all")
    return row


def _meets(row: Row, use: Use, context: int) -> tuple[bool, list[str]]:
    why: list[str] = []
    ok = True
    sp = row.speed
    if row.verdict == "does not fit":
        return False, ["does not fit" + (f" ({row.problems[0]})" if row.problems else "")]
    if use.name == "long-context" and row.trained_context and row.trained_context < context:
        ok = False
        why.append(f"trained for {row.trained_context:,} tokens < {context:,}")
    if sp is None or sp.decode_tps is None:
        ok = False
        why.append("decode speed unknown")
    elif sp.decode_tps < use.min_decode:
        ok = False
        why.append(f"decode {sp.decode_tps:g} < {use.min_decode:g} tok/s")
    else:
        why.append(f"decode {sp.decode_tps:g} tok/s")
    if sp is not None and sp.prefill_tps is not None:
        if sp.prefill_tps < use.min_prefill:
            ok = False
            why.append(f"prefill {sp.prefill_tps:g} < {use.min_prefill:g} tok/s")
        else:
            why.append(f"prefill {sp.prefill_tps:g} tok/s")
    else:
        why.append("prefill unknown")
    return ok, why


def loss_band(ppl_delta: float | None) -> int:
    """0 small (Q4_K_M and better), 1 moderate, 2 heavy; unknown counts as moderate."""
    if ppl_delta is None:
        return 1
    return 0 if ppl_delta <= SMALL_LOSS_PPL else (1 if ppl_delta <= HEAVY_LOSS_PPL else 2)


BAND_WORDS = ("small loss", "moderate loss", "heavy loss")


def rank(rows: list[Row], use_name: str, context: int) -> list[Row]:
    """Order rows for a use: rows that fit (on the GPU or with offload) first; among them those fast
    enough for the use, then those that come closest to it; then by the quant's quality band (small / moderate / heavy loss); for code,
    coder models first; then the larger model; then fitting entirely on the GPU before offload; then
    the faster one. Each row's reason says where it stands."""
    use = USES[use_name]
    for row in rows:
        row.meets, why = _meets(row, use, context)
        loss = row.ppl_delta
        size = (f"{row.dense_equiv_b:g}B dense-equivalent" if row.dense_equiv_b != _params(row)
                else f"{row.dense_equiv_b:g}B")
        band = BAND_WORDS[loss_band(loss)]
        quality = f"{row.quant} {loss:+.2f} ppl ({band})" if loss is not None \
            else f"{row.quant} quality cost unknown"
        row.reason = f"{row.verdict}; " + "; ".join(why) + f"; {size}; {quality}"

    def key(row: Row) -> tuple[Any, ...]:
        decode = row.speed.decode_tps if row.speed and row.speed.decode_tps else 0.0
        order = VERDICT_ORDER.get(row.verdict, 3)
        return (order > 1, not row.meets, -_closeness(row, use), loss_band(row.ppl_delta),
                use.name == "code" and not row.coder, -row.dense_equiv_b, order, -decode)

    ordered = sorted(rows, key=key)
    for i, row in enumerate(ordered, 1):
        row.rank = i
    return ordered


def _closeness(row: Row, use: Use) -> float:
    """1 for a row fast enough for the use, else its worst share of the speed the use needs (rows
    that fall short are ranked by how close they come, not by size)."""
    if row.meets:
        return 1.0
    sp = row.speed
    ratios = [min(sp.decode_tps / use.min_decode, 1.0) if sp and sp.decode_tps else 0.0]
    if sp and sp.prefill_tps is not None:
        ratios.append(min(sp.prefill_tps / use.min_prefill, 1.0))
    return round(min(ratios), 2)


def _params(row: Row) -> float:
    entry = next((m for m in catalog.models() if m.name == row.model), None)
    return entry.params_b if entry else row.dense_equiv_b


def recommend(gpu: Gpu, count: int, context: int, use: str, host: Host, host_ram_bytes: int | None,
              efficiencies: dict[str, Efficiency] | None = None, models: list[ModelEntry] | None = None,
              prompt_tokens: int = 512) -> list[Row]:
    """Every catalog model x quant, planned for the GPU, predicted and ranked for the use."""
    rows = [evaluate(entry, quant, gpu, count, context, host, host_ram_bytes, efficiencies, prompt_tokens)
            for entry in (models if models is not None else catalog.models()) for quant in quants_for(entry)]
    return rank(rows, use, context)
