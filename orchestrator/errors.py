"""One error shape for everything a user wrote wrong: file, line, field, what, how to fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Deployment and server names: lowercase DNS labels without '--'. They are joined by '--' (container,
# k8s and log names), so two names never make the same joined name (deployment lc + server a-b vs
# lc-a + b). The profile schema validates them; the state folder accepts nothing else.
NAME_RE = r"^[a-z0-9]+(-[a-z0-9]+)*$"

# Characters that end a line or steer a terminal: C0 and C1 controls, DEL, the Unicode line and
# paragraph separators (YAML 1.1 and some terminals break lines on them) and the bidirectional
# overrides that reorder what a reader sees.
UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
SHOWN_MAX = 60


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def one_line(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\u2028): safe inside
    one line of a shell or YAML comment and on a terminal."""
    return UNSAFE_CHARS.sub(_escape, text)


def printable(text: str) -> str:
    """Multi-line output for a terminal: newlines and tabs kept, every other control character
    (escape sequences that could erase or rewrite a line) written as an escape."""
    return _TERMINAL_UNSAFE.sub(_escape, text)


LINE_PART_MAX = 400


def capped(text: str, limit: int = LINE_PART_MAX) -> str:
    """One line, cut in the middle when longer than `limit` (an error never echoes a megabyte)."""
    text = one_line(text)
    if len(text) <= limit:
        return text
    half = limit // 2 - 2
    return f"{text[:half]} … {text[-half:]}"


def shown(value: object) -> str:
    """A user's value as an error shows it: quoted, one line, and cut short when it is long."""
    text = one_line(repr(value))
    if len(text) <= SHOWN_MAX:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else "long"
    return f"{text[:SHOWN_MAX - 1]}… ({size})"


@dataclass(frozen=True)
class Problem:
    path: tuple[str | int, ...]
    message: str
    hint: str = ""
    file: str = ""
    line: int | None = None

    @property
    def field(self) -> str:
        return format_path(self.path)

    def located(self, file: str, line: int | None) -> Problem:
        return Problem(self.path, self.message, self.hint, file, line)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else (self.file or "<profile>")
        text = f"{capped(where)}: {capped(self.field) or '(profile)'}: {capped(self.message)}"
        return f"{text} — {capped(self.hint)}" if self.hint else text

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "field": self.field,
                "message": self.message, "hint": self.hint}


def format_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class ProfileError(Exception):
    """Raised with every problem found, so the user fixes them in one go."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class OrchestratorError(Exception):
    """An operational error with a one-line message and an optional fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = capped(super().__str__())
        return f"{msg} — {capped(self.hint)}" if self.hint else msg


class ProvisionError(OrchestratorError):
    """A build, download or install failed; the message says where the log is."""
