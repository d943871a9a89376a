"""The profile loader: YAML composed node by node (never constructing arbitrary objects), duplicate
keys and non-standard tags rejected, and the line of every field kept, so each error can say
FILE:LINE: field.path: what — how to fix."""

from __future__ import annotations

import difflib
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import UNSAFE_CHARS, Problem, ProfileError, one_line, shown
from orchestrator.profile.schema import Profile
from orchestrator.profile.secrets import looks_like_secret

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


MAX_BYTES = 1 << 20       # a profile is a few KiB; anything this large is not one
MAX_DEPTH = 32            # levels of nesting, aliases expanded (a profile needs five)
MAX_VALUES = 20_000       # values after aliases are expanded (an 824-byte alias bomb expands to billions)
MAX_DIGITS = 18           # integers beyond this are typos, and Python refuses 4300+ digits


class _Budget:
    """What one document may expand to; exceeding it is a problem, not a MemoryError."""

    def __init__(self) -> None:
        self.values = 0


def _control_problem(path: tuple[str | int, ...], value: str, line: int) -> Problem | None:
    m = UNSAFE_CHARS.search(value)
    if m is None:
        return None
    return Problem(path, f"holds a control character ({one_line(m.group(0))} at position {m.start() + 1})",
                   "profile values are one line of printable text: remove it (newlines, escapes and other "
                   "control characters would reach scripts, YAML files and terminals)", line=line)


_OCTAL = re.compile(r"^[-+]?0[0-7]+$")


def _yaml11_problem(node: yaml.ScalarNode, path: tuple[str | int, ...], value: Any) -> Problem | None:
    """Plain scalars YAML 1.1 reads as something else than they look: yes/on → true, 010 → 8,
    1:30:00 → 5400, a date → a date object, << → a merge."""
    line = node.start_mark.line + 1
    raw = node.value
    tag = node.tag.rsplit(":", 1)[-1]
    if node.style is not None or tag == "str":
        return None
    quote = f"quote it ('{raw}') if you mean the text"
    what = None
    if tag == "bool" and raw.lower() not in ("true", "false"):
        what, hint = f"the boolean {str(value).lower()}", f"write true or false, or {quote}"
    elif tag == "int":
        digits = raw.replace("_", "").lstrip("+-")
        if ":" in digits:
            what = f"the base-60 number {value}"
        elif _OCTAL.match(digits) or digits.lower().startswith(("0x", "0b", "0o")):
            what = f"the number {value} (octal, hexadecimal or binary)"
        hint = f"write the decimal number without leading zeros, or {quote}"
    elif tag == "float" and ":" in raw:
        what, hint = f"the base-60 number {value}", f"write the decimal number, or {quote}"
    if what is None:
        return None
    return Problem(path, f"YAML 1.1 reads {shown(raw)} as {what}", hint, line=line)


def _scalar_data(node: yaml.ScalarNode, path: tuple[str | int, ...], problems: list[Problem]) -> Any:
    line = node.start_mark.line + 1
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "int" and len(node.value.replace("_", "").lstrip("+-")) > MAX_DIGITS:
        problems.append(Problem(path, f"the number has {len(node.value)} digits", "write a number that fits the "
                                "field (see orchestrate schema)", line=line))
        return None
    try:
        value = _scalar(node)
    except (ValueError, yaml.YAMLError) as exc:
        problems.append(Problem(path, f"{shown(node.value)} is not a valid {tag}: {one_line(str(exc))[:80]}",
                                "quote it to make it text, or fix the value", line=line))
        return None
    problem = _yaml11_problem(node, path, value)
    if problem is None and isinstance(value, str):
        problem = _control_problem(path, value, line)
    if problem is not None:
        problems.append(problem)
        return None
    return value


def _tag_problem(node: yaml.Node, path: tuple[str | int, ...]) -> Problem:
    line = node.start_mark.line + 1
    tag = str(node.tag)
    if tag.endswith(":merge"):
        return Problem(path, "YAML merge keys (<<) are not supported",
                       "write the keys out in each mapping (an anchor and alias for a whole value works)", line=line)
    if tag.endswith(":timestamp"):
        raw = node.value if isinstance(node, yaml.ScalarNode) else ""
        return Problem(path, f"YAML reads {shown(raw)} as a date", f"quote it ('{raw}') to keep it as text",
                       line=line)
    if tag.endswith(":binary"):
        return Problem(path, "YAML binary values are not allowed", "write the value as plain text", line=line)
    return Problem(path, f"YAML tag {shown(tag)} is not allowed",
                   "remove the tag; profiles hold plain strings, numbers, lists and maps", line=line)


def _to_data(node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int],
             problems: list[Problem], budget: _Budget) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    budget.values += 1
    if budget.values > MAX_VALUES or len(path) > MAX_DEPTH:
        what = (f"more than {MAX_VALUES} values" if budget.values > MAX_VALUES
                else f"more than {MAX_DEPTH} levels of nesting")
        raise ProfileError([Problem(path[:1], f"the YAML expands to {what} (anchors and aliases included)",
                                    "a profile is a small file: write the values out instead of nesting aliases",
                                    line=node.start_mark.line + 1)])
    if node.tag not in _ALLOWED_TAGS:
        problems.append(_tag_problem(node, path))
        return None
    if isinstance(node, yaml.MappingNode):
        return _mapping(node, path, lines, problems, budget)
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(child, path + (i,), lines, problems, budget) for i, child in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return _scalar_data(node, path, problems)


def _mapping(node: yaml.MappingNode, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int],
             problems: list[Problem], budget: _Budget) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        before = len(problems)
        key = _to_data(key_node, path, {}, problems, budget)
        if len(problems) > before:
            continue
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            problems.append(Problem(path, f"mapping key {shown(key)} must be a string",
                                    "quote the key", line=key_node.start_mark.line + 1))
            continue
        key = str(key)
        if key in out:
            first = lines.get(path + (key,))
            problems.append(Problem(path + (key,), f"duplicate key {shown(key)} (first on line {first})",
                                    "keep one of them; YAML would silently use the last",
                                    line=key_node.start_mark.line + 1))
            continue
        lines[path + (key,)] = key_node.start_mark.line + 1
        out[key] = _to_data(value_node, path + (key,), lines, problems, budget)
    return out


_SAFE = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node) -> Any:
    return _SAFE.construct_object(node, deep=True)


def _nesting_problem(text: str, file: str) -> Problem | None:
    """Depth from the event stream (PyYAML's parser is iterative; its composer recurses and would
    raise RecursionError on a few hundred levels)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    return Problem((), f"the YAML is nested more than {MAX_DEPTH} levels deep",
                                   "a profile needs a handful of levels: flatten it", file,
                                   event.start_mark.line + 1 if event.start_mark else None)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        return None   # compose reports it, with its line
    return None


def parse_yaml(text: str, file: str) -> Source:
    problems: list[Problem] = []
    if len(text) > MAX_BYTES:
        raise ProfileError([Problem((), f"the file is larger than {MAX_BYTES // 1024} KiB",
                                    "a profile is a few KiB of YAML: check that this is the right file", file, 1)])
    deep = _nesting_problem(text, file)
    if deep is not None:
        raise ProfileError([deep])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        what = one_line(str(getattr(exc, "problem", None) or exc))[:200]
        raise ProfileError([Problem((), f"not valid YAML: {what}",
                                    "fix the YAML syntax (indentation, quotes, colons)", file, line)]) from None
    if node is None:
        raise ProfileError([Problem((), "the file is empty", "start from examples/quickstart-cpu.yaml", file, 1)])
    lines: dict[tuple[str | int, ...], int] = {}
    try:
        data = _to_data(node, (), lines, problems, _Budget())
    except ProfileError as exc:
        raise ProfileError([p.located(file, p.line) for p in exc.problems]) from None
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
    last = loc[-1] if loc else None
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{shown(err.get('input'))} is not allowed", f"use one of {expected}"
    if kind == "string_pattern_mismatch" and last == "name":
        return f"{shown(err.get('input'))} is not a valid name", "use lowercase letters, digits and single '-' between them (DNS-safe, max 63; '--' joins names)"
    if kind == "string_pattern_mismatch" and last == "engine_version":
        return (f"{shown(err.get('input'))} is not a version",
                "write a build (b11434), a commit (55d3c05bf), a date (2026-04-13) or a release (0.32.0)")
    if kind == "value_error" and last == "api_key_env":
        return (msg.removeprefix("Value error, "),
                "give the NAME of the variable that holds the key (e.g. LLAMA_API_KEY), never the key itself; export the "
                "key in that variable, and rotate it if a real key was written here")
    if kind == "value_error" and last == "env":
        return (msg.removeprefix("Value error, "),
                "use variable names (letters, digits and _, not starting with a digit); a secret's value goes in "
                "your environment, referenced as NAME: '${NAME}'")
    if kind.startswith("int_") or kind.startswith("bool_") or kind.startswith("string_type") or kind.endswith("_type"):
        got = "a value that looks like a secret" if last == "api_key_env" else shown(err.get("input"))
        return msg.lower(), f"write a value of the right type (got {got})"
    if kind in ("greater_than_equal", "less_than_equal", "too_short", "too_long", "string_too_long"):
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


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


class UnsafeReference(ValueError):
    """A ${VAR} whose value must not be written into plans and rendered files."""


def expand_path(value: str, environ: dict[str, str], secret_vars: frozenset[str] = frozenset()) -> str:
    """Expand ~ and ${VAR} (a missing variable is an error, never silently empty). Only variables
    that are safe to show are expanded (the path appears in plan and every rendered file): not a
    variable holding an API key (secret_vars), not one named like a secret, and not a value that
    looks like a key or holds control characters (UnsafeReference)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in environ:
            raise KeyError(name)
        if name in secret_vars or _SECRET_NAME.search(name):
            raise UnsafeReference(f"${{{name}}} names a secret; its value would be written into the plan "
                                  "and every rendered file")
        found = environ[name]
        # A folder may hold hex (an HF snapshot); a value without any '/' that looks like a key is one.
        if UNSAFE_CHARS.search(found) or ("/" not in found and looks_like_secret(found)):
            raise UnsafeReference(f"${{{name}}} holds a value that looks like a secret or holds control "
                                  "characters; it is not expanded into the plan and rendered files")
        return found
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


def _display(path: str) -> str:
    return path if len(path) <= 256 else shown(path)


def read_profile_text(path: str | Path) -> str:
    """The profile's text: a regular file of at most MAX_BYTES, opened without blocking (a FIFO or
    device is refused before anything is read), decoded as UTF-8 with the line of a bad byte."""
    file = _display(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ProfileError([Problem((), "file not found", "check the path", file)]) from None
    except OSError as exc:
        raise ProfileError([Problem((), f"cannot read: {exc.strerror or exc}", "check the path", file)]) from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise ProfileError([Problem((), f"not a regular file ({kind})", "give the path of a profile .yaml file",
                                        file)])
        raw = fh.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ProfileError([Problem((), f"the file is larger than {MAX_BYTES // 1024} KiB",
                                    "a profile is a few KiB of YAML: check that this is the right file", file, 1)])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ProfileError([Problem((), f"not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                                    "save the file as UTF-8", file, line)]) from None


def load(path: str | Path) -> LoadedProfile:
    return load_text(read_profile_text(path), _display(str(path)))


def json_schema() -> dict[str, Any]:
    return Profile.model_json_schema()
