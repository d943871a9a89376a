"""The gateway's part of the plan: where it listens, the memory budget it swaps on-demand servers
within (defaults from the hardware, as fit counts it), what each server needs of it (its fit
estimate), and the checks a profile with start: on_demand must pass. Pure, like the rest of plan/."""

from __future__ import annotations

from orchestrator import __version__
from orchestrator.catalog import LOCAL_IMAGE_PREFIX
from orchestrator.errors import Problem
from orchestrator.facts.types import Facts
from orchestrator.plan.fit import FIT_MARGIN_BYTES
from orchestrator.plan.model import (
    GIB,
    GatewayPlan,
    RoutePlan,
    RouteTier,
    ServerPlan,
    SwapBudget,
    ToolCallsPlan,
    is_loopback,
)
from orchestrator.profile import Profile

RAM = "RAM"


def gpu_resource(index: int) -> str:
    return f"GPU {index}"


def check_gateway(profile: Profile) -> list[Problem]:
    """Profile-level rules of the gateway and the start modes (before any server is planned)."""
    problems: list[Problem] = []
    gw = profile.gateway
    for i, s in enumerate(profile.servers):
        if s.start == "on_demand" and gw is None:
            problems.append(Problem(("servers", i, "start"), "start: on_demand needs a gateway to start it",
                                    "add a gateway: section (host, port) or set start: always"))
        if s.idle_timeout is not None and s.start != "on_demand":
            problems.append(Problem(("servers", i, "idle_timeout"), "idle_timeout applies to on_demand servers only",
                                    "set start: on_demand, or remove idle_timeout"))
    names = [s.name for s in profile.servers]
    for i, s in enumerate(profile.servers):
        tc = s.tool_calls
        if tc is None:
            continue
        if gw is None:
            problems.append(Problem(("servers", i, "tool_calls"), "tool_calls are checked by the gateway, and the "
                                    "profile has none", "add a gateway: section (host, port), or remove tool_calls"))
        if tc.escalate_to is not None and (tc.escalate_to == s.name or tc.escalate_to not in names):
            others = ", ".join(n for n in names if n != s.name) or "none"
            problems.append(Problem(("servers", i, "tool_calls", "escalate_to"),
                                    f"escalate_to {tc.escalate_to!r} is not another server of this profile",
                                    f"name one of the other servers ({others}), or remove escalate_to"))
        if tc.escalate_to is not None and not tc.check:
            problems.append(Problem(("servers", i, "tool_calls", "escalate_to"), "escalate_to needs validate: true "
                                    "(nothing is found invalid without it)", "set validate: true"))
    if gw is None:
        return problems
    if not is_loopback(gw.host) and not gw.api_key_env:
        problems.append(Problem(("gateway", "host"), f"host {gw.host} exposes the gateway beyond this machine "
                                "without an API key", "set gateway.api_key_env: NAME_OF_VAR (holding the key), or "
                                "use host: 127.0.0.1"))
    for i, s in enumerate(profile.servers):
        if s.port == gw.port:
            problems.append(Problem(("gateway", "port"), f"port {gw.port} is also servers[{i}] ({s.name})'s port",
                                    "give the gateway a port of its own"))
    return problems


ROUTE_LEVELS = ("simple", "medium", "complex")


def _routes(profile: Profile, servers: list[ServerPlan]) -> tuple[list[RoutePlan], list[Problem]]:
    """gateway.routes as planned: each tier's server exists, tiers are ordered (each up_to above the one
    before, only the last without), thresholds rise, and a route's name is no server's served_name."""
    assert profile.gateway is not None
    problems: list[Problem] = []
    served = {sp.served_name: sp.name for sp in servers}
    by_name = {sp.name: sp for sp in servers}
    out = []
    for name, r in profile.gateway.routes.items():
        at = ("gateway", "routes", name)
        if not name.strip() or len(name) > 128:
            problems.append(Problem(at, f"route name {name!r} is empty or longer than 128 characters",
                                    "name it like a model, e.g. auto"))
        if name in served:
            problems.append(Problem(at, f"route {name!r} has the name server {served[name]} serves",
                                    "rename the route or that server's model.served_name"))
        tiers, last_rank = [], -1
        for i, t in enumerate(r.tiers):
            if t.server not in by_name:
                problems.append(Problem((*at, "tiers", i, "server"), f"no server is named {t.server!r}",
                                        f"use one of: {', '.join(sorted(by_name))}"))
            if t.up_to is None and i != len(r.tiers) - 1:
                problems.append(Problem((*at, "tiers", i, "up_to"), "only the last tier may leave up_to out",
                                        "give this tier up_to: simple, medium or complex"))
            if t.up_to is not None:
                rank = ROUTE_LEVELS.index(t.up_to)
                if rank <= last_rank:
                    problems.append(Problem((*at, "tiers", i, "up_to"), f"up_to: {t.up_to} is not above the tier "
                                            "before's: tiers go from the cheapest (lowest level) up",
                                            "order the tiers simple, medium, complex, then the last without up_to"))
                last_rank = max(last_rank, rank)
            sp = by_name.get(t.server)
            tiers.append(RouteTier(t.server, sp.served_name if sp else t.server, t.up_to))
        if r.tiers and r.tiers[-1].up_to is not None:
            problems.append(Problem((*at, "tiers", len(r.tiers) - 1, "up_to"), "the last tier must take every "
                                    "request above the others", "remove up_to from the last tier"))
        judge = r.judge.server or (r.tiers[0].server if r.tiers else None)
        if r.judge.enabled and judge not in by_name:
            problems.append(Problem((*at, "judge", "server"), f"no server is named {judge!r}",
                                    f"use one of: {', '.join(sorted(by_name))}"))
        th = r.thresholds
        if not th.simple < th.medium < th.complex:
            problems.append(Problem((*at, "thresholds"), f"thresholds must rise: simple {th.simple} < medium "
                                    f"{th.medium} < complex {th.complex}", "order the three values"))
        out.append(RoutePlan(name, tiers, {"simple": th.simple, "medium": th.medium, "complex": th.complex},
                             r.sticky, r.escalate_after, judge if r.judge.enabled else None, r.judge.margin,
                             r.judge.timeout_ms))
    return out, problems


def _default_budgets(facts: Facts) -> list[SwapBudget]:
    out: list[SwapBudget] = []
    if not facts.gpu.is_cpu:
        per_gpu = int(facts.gpu.vram_gb * GIB) - FIT_MARGIN_BYTES
        out += [SwapBudget(gpu_resource(i), per_gpu, f"{facts.gpu.name} VRAM {facts.gpu.vram_gb:g} GB less fit's "
                       f"{FIT_MARGIN_BYTES / GIB:.0f} GiB margin") for i in range(facts.gpu_count)]
    if facts.host_ram_bytes:
        out.append(SwapBudget(RAM, facts.host_ram_bytes, "this machine's RAM, as fit counts it"))
    else:
        out.append(SwapBudget(RAM, None, "RAM not detected: not checked"))
    return out


def _budgets(profile: Profile, facts: Facts) -> list[SwapBudget]:
    assert profile.gateway is not None
    given = profile.gateway.memory_budget
    out = []
    for b in _default_budgets(facts):
        value = given.ram if b.resource == RAM else given.gpu
        out.append(SwapBudget(b.resource, int(value), "gateway.memory_budget") if value is not None else b)
    if given.gpu is not None and facts.gpu.is_cpu:
        out.append(SwapBudget("GPU", int(given.gpu), "gateway.memory_budget (hardware.gpu is cpu: unused)"))
    return out


def server_needs(sp: ServerPlan, gpu_count: int, vram_bytes: int) -> dict[str, int]:
    """What one server takes of each resource: its fit estimate spread over its GPUs, weights kept in
    system RAM on RAM; vLLM/SGLang take their memory fraction of each GPU whatever the model needs."""
    e = sp.estimate
    if e is None:
        return {}
    if sp.gpu_count == 0:
        return {RAM: e.total_bytes + e.host_bytes}
    ids = sp.gpu_ids if sp.gpu_ids is not None else list(range(gpu_count))
    per_gpu = -(-e.total_bytes // max(len(ids), 1))
    fraction = sp.settings.memory_fraction if sp.settings else None
    if fraction:
        per_gpu = max(per_gpu, int(fraction * vram_bytes))
    needs = {gpu_resource(i): per_gpu for i in ids}
    if e.host_bytes:
        needs[RAM] = e.host_bytes
    return needs


def _fits(needs: dict[str, int], used: dict[str, int], budgets: list[SwapBudget]) -> list[str]:
    """The resources where needs + used exceed the budget, with the figures."""
    over = []
    for b in budgets:
        want = needs.get(b.resource, 0) + used.get(b.resource, 0)
        if b.bytes is not None and needs.get(b.resource, 0) and want > b.bytes:
            over.append(f"{b.resource} {want / GIB:.2f} GiB of {b.bytes / GIB:.2f} GiB")
    return over


def plan_gateway(profile: Profile, facts: Facts, servers: list[ServerPlan]) -> tuple[GatewayPlan | None, list[Problem]]:
    gw = profile.gateway
    if gw is None:
        return None, []
    problems: list[Problem] = []
    budgets = _budgets(profile, facts)
    vram = int(facts.gpu.vram_gb * GIB)
    needs = {sp.name: server_needs(sp, facts.gpu_count, vram) for sp in servers}
    index = {s.name: i for i, s in enumerate(profile.servers)}
    seen: dict[str, str] = {}
    for sp in servers:
        if sp.served_name in seen:
            problems.append(Problem(("servers", index[sp.name], "model", "served_name"),
                                    f"{sp.name} serves {sp.served_name!r}, as {seen[sp.served_name]} does: the "
                                    "gateway routes by model name", "give each server its own model.served_name"))
        seen.setdefault(sp.served_name, sp.name)
    always: dict[str, int] = {}
    for sp in servers:
        if sp.start == "always":
            for r, b in needs[sp.name].items():
                always[r] = always.get(r, 0) + b
    over = _fits(always, {}, budgets)
    if over:
        problems.append(Problem(("gateway", "memory_budget"), "the start: always servers alone exceed the memory "
                                f"budget: {'; '.join(over)}", "raise gateway.memory_budget, or make servers "
                                "start: on_demand"))
    for sp in servers:
        if sp.start == "on_demand" and not over:
            lack = _fits(needs[sp.name], always, budgets)
            if lack:
                problems.append(Problem(("servers", index[sp.name], "start"), f"{sp.name} can never start beside "
                                        f"the start: always servers: {'; '.join(lack)}",
                                        "raise gateway.memory_budget, lower its context/parallel, or make fewer "
                                        "servers start: always"))
    notes = [f"{sp.name}: no memory estimate; counted as 0" for sp in servers if sp.estimate is None]
    tool_calls = {s.name: ToolCallsPlan(s.tool_calls.repair, s.tool_calls.retries, s.tool_calls.constrained,
                                        s.tool_calls.escalate_to, s.tool_calls.on_failure)
                  for s in profile.servers if s.tool_calls is not None and s.tool_calls.check}
    image, image_reason = gateway_image(gw.image)
    routes, route_problems = _routes(profile, servers)
    problems += route_problems
    plan = GatewayPlan(host=gw.host, port=gw.port, api_key_env=gw.api_key_env, budgets=budgets, needs=needs,
                       max_body_bytes=int(gw.max_body), queue=gw.queue, start_timeout_s=gw.start_timeout, notes=notes,
                       routes=routes, prefix_report=gw.prefix_cache.report,
                       normalize_tools=gw.prefix_cache.normalize_tools, image=image, image_reason=image_reason,
                       tool_calls=tool_calls)
    return plan, problems


def default_gateway_image() -> str:
    """The tag `orchestrate engines image gateway` gives the gateway image of this version."""
    return f"{LOCAL_IMAGE_PREFIX}gateway:{__version__}"


def gateway_image(given: str | None) -> tuple[str, str]:
    if given:
        return given, "gateway.image"
    return default_gateway_image(), "built here by `orchestrate engines image gateway` (no registry has it)"


def describe(gw: GatewayPlan) -> list[str]:
    """The gateway's lines in the plan's text form."""
    key = f"clients send the key in ${gw.api_key_env}" if gw.api_key_env else "no API key (loopback only)"
    lines = [f"gateway: listens on {gw.host}:{gw.port}; {key}; routes /v1 requests by model name",
             f"  limits: request body {gw.max_body_bytes / 2**20:g} MiB; {gw.queue} waiting requests per server, "
             "then 429"]
    for b in gw.budgets:
        figure = f"{b.bytes / GIB:.2f} GiB" if b.bytes is not None else "unlimited"
        lines.append(f"  memory budget {b.resource}: {figure} ({b.reason})")
    for r in gw.routes:
        tiers = ", ".join(f"{t.server} ({t.served_name}) up to {t.up_to}" if t.up_to else f"{t.server} "
                          f"({t.served_name}) above" for t in r.tiers)
        th = ", ".join(f"{k} < {v:g}" for k, v in r.thresholds.items())
        sticky = f"{r.sticky} conversations sticky" if r.sticky else "no stickiness"
        lines.append(f"  route {r.name}: {tiers}; scores {th}; {sticky}; up a tier after "
                     f"{r.escalate_after} failed tool calls, a 5xx or a context overflow")
        if r.judge_server:
            lines.append(f"    judged by {r.judge_server} (one token, {r.judge_timeout_ms} ms at most) within "
                         f"{r.judge_margin:g} of a threshold")
    for name, tc in sorted(gw.tool_calls.items()):
        steps = ["checked against each request's tools and tool_choice"] + (["repaired/rescued"] if tc.repair else [])
        steps.append(f"{tc.retries} retr{'y' if tc.retries == 1 else 'ies'} with the errors")
        if tc.constrained:
            steps.append("a constrained retry where the engine can")
        if tc.escalate_to:
            steps.append(f"then {tc.escalate_to}")
        steps.append("then a 502" if tc.on_failure == "error" else "then the raw answer marked unvalidated")
        lines.append(f"  tool calls of {name}: " + "; ".join(steps))
    if gw.prefix_report:
        norm = ("tool definitions and schema keys sorted before relaying (changes what the model sees)"
                if gw.normalize_tools else "requests relayed unchanged")
        lines.append(f"  prefix cache: reuse measured per request (/metrics, cache-report); {norm}")
    lines += [f"  note: {n}" for n in gw.notes]
    return lines


def describe_start(sp: ServerPlan, gw: GatewayPlan) -> str:
    need = ", ".join(f"{r} {b / GIB:.2f} GiB" for r, b in sorted(gw.needs.get(sp.name, {}).items())) or "unknown"
    if sp.start == "always":
        return f"  start: always (up starts it; the gateway never stops it); needs {need}"
    idle = f"stops it after {sp.idle_timeout_s} s idle" if sp.idle_timeout_s else "stops it only to make room"
    return f"  start: on_demand (the gateway starts it on its first request, {idle}); needs {need}"
