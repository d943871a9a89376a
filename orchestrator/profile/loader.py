"""The profile loader: YAML composed node by node (never constructing arbitrary objects), duplicate
keys and non-standard tags rejected, and the line of every field kept, so each error can say
FILE:LINE: field.path: what — how to fix."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import Problem, ProfileError
from orchestrator.profile.schema import Profile

_ALLOWED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


class Source:
    """A loaded YAML document: plain data plus the line of every path."""

    def __init__(self, file: str, data: Any, lines: dict[tuple[str | int, ...], int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def locate(self, problem: Problem) -> Problem:
        return problem.located(self.file, self.line_of(problem.path))


def _to_data(node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int],
             problems: list[Problem]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _ALLOWED_TAGS:
        problems.append(Problem(path, f"YAML tag {node.tag!r} is not allowed",
                                "remove the tag; profiles hold plain strings, numbers, lists and maps",
                                line=node.start_mark.line + 1))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _to_data(key_node, path + ("<key>",), {}, problems)
            if not isinstance(key, (str, int)):
                problems.append(Problem(path, f"mapping key {key!r} must be a string",
                                        "quote the key", line=key_node.start_mark.line + 1))
                continue
            key = str(key)
            if key in out:
                first = lines.get(path + (key,))
                problems.append(Problem(path + (key,), f"duplicate key {key!r} (first on line {first})",
                                        "keep one of them; YAML would silently use the last",
                                        line=key_node.start_mark.line + 1))
                continue
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_data(value_node, path + (key,), lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(child, path + (i,), lines, problems) for i, child in enumerate(node.value)]
    return _scalar(node)


_SAFE = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node) -> Any:
    return _SAFE.construct_object(node, deep=True)


def parse_yaml(text: str, file: str) -> Source:
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ProfileError([Problem((), f"not valid YAML: {getattr(exc, 'problem', exc)}",
                                    "fix the YAML syntax (indentation, quotes, colons)", file, line)]) from None
    if node is None:
        raise ProfileError([Problem((), "the file is empty", "start from examples/quickstart-cpu.yaml", file, 1)])
    lines: dict[tuple[str | int, ...], int] = {}
    data = _to_data(node, (), lines, problems)
    if problems:
        raise ProfileError([p.located(file, p.line) for p in problems])
    return Source(file, data, lines)


def _hint_for(err: Any, model_fields: list[str]) -> tuple[str, str]:
    kind = err["type"]
    loc = err["loc"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, model_fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(model_fields)}"
        return f"unknown key {name!r}", hint
    if kind == "missing":
        return "required field is missing", f"add {loc[-1]}:"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err.get('input')!r} is not allowed", f"use one of {expected}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return f"{err.get('input')!r} is not a valid name", "use lowercase letters, digits and '-', starting and ending alphanumeric (DNS-safe, max 63)"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "api_key_env":
        return f"{err.get('input')!r} is not an environment variable name", "give the NAME of the variable holding the key (e.g. LLAMA_KEY), never the key itself"
    if kind.startswith("int_") or kind.startswith("bool_") or kind.startswith("string_type") or kind.endswith("_type"):
        return msg.lower(), f"write a value of the right type (got {err.get('input')!r})"
    if kind in ("greater_than_equal", "less_than_equal", "too_short", "too_long"):
        return msg.lower(), "change the value to lie within the allowed range"
    if kind == "value_error":
        return msg.removeprefix("Value error, "), "fix the value as described"
    return msg, "see the profile schema (orchestrate schema)"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Profile
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if info is None:
            break
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        model = nxt
    return list(model.model_fields) if model is not None and hasattr(model, "model_fields") else []


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors():
        # Union members produce a type tag in loc (e.g. 'list[int]', 'literal['all']'): drop them.
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in ("int", "str")))
        message, hint = _hint_for(err, _fields_at(loc))
        out.append(Problem(loc, message, hint))
    # Unions report once per member; keep the first per path.
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for p in out:
        if p.path not in seen:
            seen.add(p.path)
            unique.append(p)
    return unique


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str, environ: dict[str, str]) -> str:
    """Expand ~ and ${VAR} (a missing variable is an error, never silently empty)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in environ:
            raise KeyError(m.group(1))
        return environ[m.group(1)]
    out = _VAR_RE.sub(sub, value)
    if out == "~" or out.startswith("~/"):
        home = environ.get("HOME") or str(Path.home())
        out = home + out[1:]
    return out


class LoadedProfile:
    """A validated profile and the source it came from (for line numbers)."""

    def __init__(self, profile: Profile, source: Source) -> None:
        self.profile = profile
        self.source = source

    @property
    def file(self) -> str:
        return self.source.file


def load_text(text: str, file: str = "<profile>") -> LoadedProfile:
    source = parse_yaml(text, file)
    if not isinstance(source.data, dict):
        raise ProfileError([Problem((), "a profile is a mapping with name:, hardware: and servers:",
                                    "start from examples/quickstart-cpu.yaml", file, 1)])
    try:
        profile = Profile.model_validate(source.data)
    except ValidationError as exc:
        raise ProfileError([source.locate(p) for p in _pydantic_problems(exc)]) from None
    return LoadedProfile(profile, source)


def load(path: str | Path) -> LoadedProfile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError([Problem((), "file not found", "check the path", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem((), f"cannot read: {exc}", "check the file", str(path))]) from None
    return load_text(text, str(path))


def json_schema() -> dict[str, Any]:
    return Profile.model_json_schema()
