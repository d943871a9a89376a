"""The plan's stable text form: what `orchestrate plan` prints and golden tests compare."""

from __future__ import annotations

from orchestrator.plan import gateway as gateway_text
from orchestrator.plan.model import GIB, FitEstimate, Plan, ServerPlan


def fit_summary(e: FitEstimate) -> str:
    def gib(value: float) -> str:
        return f"{value / GIB:.2f} GiB"

    avail = f" of {gib(e.available_bytes)}" if e.available_bytes else ""
    shape_known = not any("unknown" in str(n) for n in e.notes)
    kv = gib(e.kv_cache_bytes) if shape_known else "? (needs the model file)"
    compute = gib(e.compute_bytes) if shape_known else "?"
    text = (f"{e.verdict}: {gib(e.total_bytes)}{avail} on the {e.device} = weights "
            f"{gib(e.weights_bytes - e.host_bytes)} + KV {kv} + compute {compute} + runtime {gib(e.overhead_bytes)}")
    if e.host_bytes:
        text += f"; {gib(e.host_bytes)} in system RAM ({e.offload})"
    return text + f" [{e.source}]"


def explain_fit(plan: Plan) -> str:
    lines = []
    for s in plan.servers:
        e = s.estimate
        if e is None:
            continue
        lines.append(f"{s.name} ({s.engine_display} {s.engine_version}): {fit_summary(e)}")
        for note in e.notes:
            lines.append(f"  note: {note}")
        if e.changes:
            lines.append("  to make it fit, cheapest first:")
            for c in e.changes:
                lines.append(f"    {c.change}: saves {c.saves_bytes / GIB:.2f} GiB")
    lines += [f"{g.summary()}" for g in plan.gpus]
    return "\n".join(lines) + "\n"


def _flag_text(value: str | None, name: str) -> str:
    if not name:
        return value or ""
    return name if value is None else f"{name} {value}"


def explain_server(s: ServerPlan) -> list[str]:
    lines = [
        f"server {s.name}: {s.engine_display} {s.engine_version} ({s.engine_reason})",
        *([f"  version: {s.engine_version} from {s.engine_version_source}"] if s.engine_version_source else []),
        (f"  runtime: {s.runtime}; listens on {s.host}:{s.port}; serves model as {s.served_name!r}" if s.nodes == 1
         else f"  spans {s.nodes} nodes × {s.gpu_count} GPUs: a LeaderWorkerSet group (render --target k8s); the "
              f"leader listens on port {s.port} and serves model as {s.served_name!r}"),
        f"  image: {s.image or '-'} ({s.image_reason})",
    ]
    if s.executable:
        lines.append(f"  executable: {s.executable.describe()}")
    if s.estimate:
        lines.append(f"  memory: {fit_summary(s.estimate)}")
    if s.health:
        lines.append(f"  health: {s.health.ready_path} within {s.health.timeout_s}s ({s.health.timeout_reason})")
    lines.append("  flags:")
    width = max((len(_flag_text(f.value, f.name)) for f in s.flags), default=0)
    width = min(width, 48)
    for f in s.flags:
        text = _flag_text(f.value, f.name)
        tag = ("" if f.source == "rule" else f" [{f.source}]") + ("" if f.role == "all" else f" [{f.role} pods]")
        pad = text.ljust(width) if len(text) <= width else text + "\n" + " " * (width + 4)
        lines.append(f"    {pad} — {f.reason}{tag}")
    if s.env:
        lines.append("  environment:")
        for e in s.env:
            value = f"${{{e.from_env}}}" if e.from_env else e.value
            lines.append(f"    {e.name}={value} — {e.reason}")
    for w in s.warnings:
        lines.append(f"  warning: {w}")
    for n in s.notes:
        lines.append(f"  note: {n}")
    return lines


def explain(plan: Plan) -> str:
    hw = plan.hardware
    gpu = hw.name if hw.gpu == "cpu" else f"{hw.count}× {hw.name} ({hw.vram_gb:g} GB, {hw.arch})"
    lines = [f"deployment {plan.name} on {gpu}"]
    for g in plan.gpus:
        if len(g.shares) > 1:
            lines.append(f"shared memory: {g.summary()}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    if plan.gateway:
        lines += gateway_text.describe(plan.gateway)
    for s in plan.servers:
        lines.append("")
        server_lines = explain_server(s)
        if plan.gateway:
            server_lines.insert(1, gateway_text.describe_start(s, plan.gateway))
        lines += server_lines
    return "\n".join(lines) + "\n"
