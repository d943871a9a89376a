"""The lock's part in a plan: tuned flags and pinned images, applied after the rules have run.

Pure, like the rest of the planner: the pipeline read the lock and checked it against this machine
(facts/lock.py), and hands the result over as `Facts.locks`. A server whose lock entry drifted keeps
the rules' flags, and the plan says what drifted; one whose entry matches runs the tuned values, each
shown with its source (`tuned: +12% tok/s …`) beside the reason the rules had.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.facts.types import LockedServer
from orchestrator.plan.model import Flag, ServerPlan


def _settings(sp: ServerPlan, name: str, value: str | None) -> None:
    """Keep the resolved settings true to the tuned flags (health, bench and eval read them)."""
    if sp.settings is None:
        return
    if name == "-fa":
        sp.settings = replace(sp.settings, flash_attention=value != "off")
    elif name == "-ctk" and value:
        sp.settings = replace(sp.settings, kv_cache=value)
    elif name == "-np" and value and value.isdigit():
        # -c stays the profile's context × parallel, split across fewer slots: each gets more.
        total = sp.settings.context * sp.settings.slots
        sp.settings = replace(sp.settings, slots=int(value), context=total // int(value))


def apply_tuning(sp: ServerPlan, tuned: tuple[tuple[str, str | None], ...], why: str) -> None:
    """Each tuned (flag, value) replaces the rules' flag of that name, or joins the flags before the
    user's extra_args when the rules leave it at the engine's default. Slots only ever fewer than the
    profile's parallel: -c is split across them, and more would give each less than the profile's context."""
    for name, value in tuned:
        if name == "-np" and sp.settings is not None and not (value and value.isdigit()
                                                             and 1 <= int(value) <= sp.settings.slots):
            sp.warnings.append(f"the lock's -np {value} is not applied: tuning may only lower the slots below the "
                               f"profile's parallel {sp.settings.slots} (re-run orchestrate tune)")
            continue
        at = next((i for i, f in enumerate(sp.flags) if f.name == name), None)
        if at is not None:
            old = sp.flags[at]
            sp.flags[at] = Flag(name, value, f"{why}; the rules chose {old.value if old.value is not None else 'it'}: "
                                f"{old.reason}", "tuned", role=old.role)
        else:
            end = next((i for i, f in enumerate(sp.flags) if f.source == "user"), len(sp.flags))
            sp.flags.insert(end, Flag(name, value, f"{why}; the rules leave it at the engine's default", "tuned"))
        _settings(sp, name, value)


def apply_lock(sp: ServerPlan, locked: LockedServer | None) -> None:
    if locked is None:
        return
    sp.notes.extend(locked.notes)
    if locked.drift:
        sp.warnings.append(f"the lock {locked.file} no longer matches, so the rules' flags are used: "
                           + "; ".join(locked.drift) + " (--locked makes this an error)")
        return
    if locked.tuned:
        apply_tuning(sp, locked.tuned, locked.tuned_why)
    else:
        sp.notes.append(f"lock {locked.file} matches this machine; it holds no tuned flags for this server "
                        "(the rules' flags held, or it was locked without tuning)")
    if locked.image and sp.image and locked.image != sp.image:
        sp.image_reason = f"{sp.image} pinned by the digest in {locked.file}; {sp.image_reason}"
        sp.image = locked.image
