"""One error shape for everything a user wrote wrong: file, line, field, what, how to fix."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        text = f"{where}: {self.field or '(profile)'}: {self.message}"
        return f"{text} — {self.hint}" if self.hint else text

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
        msg = super().__str__()
        return f"{msg} — {self.hint}" if self.hint else msg


class ProvisionError(OrchestratorError):
    """A build, download or install failed; the message says where the log is."""
