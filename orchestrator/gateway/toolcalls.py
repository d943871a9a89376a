"""Tool calls in a chat answer, checked against the request that asked for them (pure: no I/O).

- `check`: each call names one of the request's `tools`, its arguments parse as a JSON object and
  validate against that tool's JSON Schema (jsonschema; its messages become the retry's feedback), and
  `tool_choice` is respected (none / auto / required / a named function).
- `repair`: argument JSON that does not parse is repaired with json-repair; accepted only if the
  answer then passes `check`.
- `rescue`: calls a model wrote as text (Qwen/Hermes `<tool_call>`, Mistral `[TOOL_CALLS]`, Llama 3
  `<|python_tag|>`, `<function=NAME>`, code fences, bare JSON) become proper `tool_calls`; accepted only
  if they then pass `check`.
- `retry_body` gives the model the validation errors; `constrained_body` asks an engine that can
  constrain its output for a JSON object that can only be a call to one of the tools with schema-valid
  arguments (llama.cpp `json_schema`, vLLM/SGLang `response_format`), and `from_constrained` reads it.
- `chunks`: a validated answer as OpenAI chat.completion.chunk SSE events.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import json_repair
from jsonschema import exceptions as schema_exceptions
from jsonschema import validators

CHAT = "/v1/chat/completions"
CONSTRAINED_ENGINES = ("llama.cpp", "ik_llama", "vllm", "sglang")

# Failure kinds (metrics labels and the eval's breakdown).
NO_CALL = "no_call"                # a call was required and the answer has none
UNWANTED = "unwanted_call"         # tool_choice none, or a call to another function than the one named
UNKNOWN_TOOL = "unknown_tool"      # a name that is not one of the request's tools
BAD_JSON = "bad_json"              # arguments that do not parse as a JSON object
SCHEMA = "schema"                  # arguments that do not validate against the tool's parameters
TEXT_CALL = "text_call"            # a call attempt written as text that could not be rescued


@dataclass
class Verdict:
    ok: bool
    calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.kinds[0] if self.kinds else ""


def tools_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The request's functions: name -> parameters schema ({} when a tool gives none)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type", "function") == "function":
            fn = tool.get("function") or {}
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def choice_of(body: dict[str, Any]) -> str:
    """'auto', 'none', 'required', or 'function:NAME'."""
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        fn = choice.get("function") or {}
        name = fn.get("name") if isinstance(fn, dict) else None
        return f"function:{name}" if isinstance(name, str) else "required"
    return choice if choice in ("auto", "none", "required") else "auto"


def schema_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """jsonschema's messages for what is wrong with value, each with its path; [] when it validates.
    A schema that is itself invalid is reported as such (the request's fault, not the model's)."""
    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except schema_exceptions.SchemaError as exc:
        return [f"the tool's parameters are not a valid JSON Schema: {exc.message}"]
    out = []
    for err in sorted(cls(schema).iter_errors(value), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path)
        out.append(f"{where or '(top level)'}: {err.message}")
    return out


def message_of(answer: Any) -> dict[str, Any] | None:
    """The first choice's message of a chat.completion, or None when the answer is not one."""
    if not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    msg = choices[0].get("message")
    return msg if isinstance(msg, dict) else None


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def make_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or _call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _parse_args(raw: Any) -> tuple[dict[str, Any] | None, str]:
    if isinstance(raw, dict):
        return raw, ""
    if raw is None or raw == "":
        return {}, ""
    if not isinstance(raw, str):
        return None, f"arguments must be a JSON object string, not {type(raw).__name__}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, f"arguments are not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, not {type(value).__name__}"
    return value, ""


def check(body: dict[str, Any], message: dict[str, Any]) -> Verdict:
    """Whether the message's tool calls are what the request allows."""
    tools = tools_of(body)
    choice = choice_of(body)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        return Verdict(False, [], ["tool_calls is not a list"], [BAD_JSON])
    v = Verdict(True, calls)
    if choice == "none":
        if calls:
            v.ok = False
            v.errors.append("tool_choice is none but the answer calls a tool; answer in text")
            v.kinds.append(UNWANTED)
        return v
    if not calls:
        if choice != "auto":
            wanted = choice.split(":", 1)[1] if choice.startswith("function:") else "one of " + ", ".join(tools)
            v.ok = False
            v.errors.append(f"a tool call is required (tool_choice {choice}) but the answer has none: call {wanted}")
            v.kinds.append(NO_CALL)
        elif looks_like_call(message.get("content"), tools):
            v.ok = False
            v.errors.append("the answer writes a tool call as text instead of calling the tool")
            v.kinds.append(TEXT_CALL)
        return v
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in tools:
            v.errors.append(f"call {i}: {name!r} is not one of the tools ({', '.join(tools)})")
            v.kinds.append(UNKNOWN_TOOL)
            continue
        if choice.startswith("function:") and name != choice.split(":", 1)[1]:
            v.errors.append(f"call {i}: tool_choice names {choice.split(':', 1)[1]}, not {name}")
            v.kinds.append(UNWANTED)
            continue
        assert isinstance(fn, dict)
        args, problem = _parse_args(fn.get("arguments"))
        if args is None:
            v.errors.append(f"call {i} ({name}): {problem}")
            v.kinds.append(BAD_JSON)
            continue
        errs = schema_errors(tools[name], args)
        if errs:
            v.errors += [f"call {i} ({name}) arguments {e}" for e in errs]
            v.kinds.append(SCHEMA)
    v.ok = not v.errors
    return v


def with_calls(answer: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer with its first choice's message carrying these calls (and no text)."""
    out = copy.deepcopy(answer)
    choice = out["choices"][0]
    choice["message"] = {**choice["message"], "content": None, "tool_calls": calls}
    choice["finish_reason"] = "tool_calls"
    return out


def repair(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any] | None:
    """The answer with its calls' argument JSON repaired, if that makes it pass; else None."""
    msg = message_of(answer)
    calls = msg.get("tool_calls") if msg else None
    if not calls or not isinstance(calls, list):
        return None
    fixed, changed = [], False
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            return None
        args = fn.get("arguments")
        if isinstance(args, str) and _parse_args(args)[0] is None:
            value = json_repair.loads(args)
            if not isinstance(value, dict):
                return None
            fixed.append(make_call(str(fn.get("name")), value, c.get("id")))
            changed = True
        else:
            fixed.append(c)
    if not changed:
        return None
    out = with_calls(answer, fixed)
    return out if check(body, message_of(out) or {}).ok else None


# ---------------------------------------------------------------------- rescue from text

_TAGGED = [
    re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S),                     # Qwen, Hermes
    re.compile(r"<\|tool_call_start\|>\s*(.*?)\s*(?:<\|tool_call_end\|>|$)", re.S),     # LFM2
    re.compile(r"<tool_calls>\s*(.*?)\s*(?:</tool_calls>|$)", re.S),
    re.compile(r"\[TOOL_CALLS\]\s*(.*)$", re.S),                                        # Mistral
    re.compile(r"<\|python_tag\|>\s*(.*?)\s*(?:<\|eom_id\|>|<\|eot_id\|>|$)", re.S),   # Llama 3.x
    re.compile(r"```(?:json|tool_call|tool_code)?\s*\n?(.*?)```", re.S),                 # code fences
]
_FUNCTION_TAG = re.compile(r"<function=([A-Za-z0-9_.\-]+)>\s*(.*?)\s*(?:</function>|$)", re.S)  # Llama 3.1 / functionary
_MISTRAL_ARGS = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*(.*?)(?=\[TOOL_CALLS\]|$)", re.S)
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function=", "<|tool_call_start|>", "\"arguments\"",
            "\"parameters\"")


def looks_like_call(content: Any, tools: dict[str, dict[str, Any]]) -> bool:
    """Whether text is an attempt at a tool call: a call marker, or a tool's name quoted as in JSON."""
    if not isinstance(content, str):
        return False
    return any(m in content for m in _MARKERS) or any(f'"{name}"' in content for name in tools)


def _json_values(text: str) -> list[Any]:
    """The JSON values in text: the whole of it if it parses, else every object/array that starts at a
    `{` or `[` and parses (outermost first), else what json-repair makes of it."""
    text = text.strip()
    if not text:
        return []
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = dec.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            out.append(value)
            i = end
        else:
            i += 1
    if out:
        return out
    start = min((p for p in (text.find("{"), text.find("[")) if p >= 0), default=-1)
    if start < 0:
        return []
    repaired = json_repair.loads(text[start:])
    return [repaired] if isinstance(repaired, dict | list) and repaired else []


def _as_calls(value: Any, tools: dict[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    """(name, arguments) pairs a JSON value written by a model stands for."""
    if isinstance(value, list):
        return [pair for item in value for pair in _as_calls(item, tools)]
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("tool_calls"), list):
        return _as_calls(value["tool_calls"], tools)
    if isinstance(value.get("function"), dict):
        return _as_calls(value["function"], tools)
    name = next((value[k] for k in ("name", "tool", "tool_name", "function", "recipient_name")
                 if isinstance(value.get(k), str)), None)
    if name is not None:
        name = name.removeprefix("functions.")
        args = next((value[k] for k in ("arguments", "parameters", "args", "input", "params") if k in value), None)
        if args is None:
            args = {k: v for k, v in value.items() if k not in ("name", "tool", "tool_name", "function", "type", "id")}
        if isinstance(args, str):
            parsed = _parse_args(args)[0]
            args = parsed if parsed is not None else json_repair.loads(args)
        return [(name, args)] if isinstance(args, dict) else []
    # bare arguments: a call only when exactly one tool's schema accepts the object
    fits = [n for n, schema in tools.items() if schema.get("properties") and not schema_errors(schema, value)]
    return [(fits[0], value)] if len(fits) == 1 else []


def _candidates(text: str, tools: dict[str, dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    out: list[list[tuple[str, Any]]] = []
    fn_tags = [(m.group(1), json_repair.loads(m.group(2)) or {}) for m in _FUNCTION_TAG.finditer(text)]
    if fn_tags:
        out.append([(n, a) for n, a in fn_tags if isinstance(a, dict)])
    mistral = [(m.group(1), json_repair.loads(m.group(2)) or {}) for m in _MISTRAL_ARGS.finditer(text)]
    if mistral:
        out.append([(n, a) for n, a in mistral if isinstance(a, dict)])
    for pattern in _TAGGED:
        pairs = [pair for m in pattern.finditer(text) for v in _json_values(m.group(1)) for pair in _as_calls(v, tools)]
        if pairs:
            out.append(pairs)
    pairs = [pair for v in _json_values(text) for pair in _as_calls(v, tools)]
    if pairs:
        out.append(pairs)
    return out


def rescue(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any] | None:
    """The answer with the calls its text holds as proper tool_calls, if they pass; else None."""
    msg = message_of(answer)
    if msg is None or msg.get("tool_calls") or choice_of(body) == "none":
        return None
    text = msg.get("content")
    if not isinstance(text, str) or not text.strip():
        return None
    tools = tools_of(body)
    for pairs in _candidates(text, tools):
        out = with_calls(answer, [make_call(n, a) for n, a in pairs])
        if check(body, message_of(out) or {}).ok:
            return out
    return None


# ---------------------------------------------------------------------- retries

def retry_body(body: dict[str, Any], answer: dict[str, Any] | None, errors: list[str]) -> dict[str, Any]:
    """The request again, with the model's answer and what was wrong with it, asking for a fix."""
    tools = tools_of(body)
    msg = message_of(answer) or {}
    said = msg.get("content") or ""
    if msg.get("tool_calls"):
        said = (said + "\n" if said else "") + json.dumps(
            [c.get("function") for c in msg["tool_calls"] if isinstance(c, dict)], ensure_ascii=False)
    feedback = ("Your previous answer was not a valid tool call:\n" + "\n".join(f"- {e}" for e in errors[:8])
                + f"\nCall one of these tools with arguments that match its parameters: {', '.join(tools)}.")
    messages = list(body.get("messages") or [])
    if said:
        messages.append({"role": "assistant", "content": said[:4000]})
    messages.append({"role": "user", "content": feedback})
    return {**body, "messages": messages}


def call_schema(body: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema that admits exactly a call to one of the request's tools (the one tool_choice names,
    if it names one) with arguments valid for it: anyOf over {name: const, arguments: parameters}."""
    tools = tools_of(body)
    choice = choice_of(body)
    if choice.startswith("function:") and choice.split(":", 1)[1] in tools:
        tools = {choice.split(":", 1)[1]: tools[choice.split(":", 1)[1]]}
    options = [{"type": "object", "properties": {"name": {"const": name},
                                                 "arguments": params or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}
               for name, params in tools.items()]
    return options[0] if len(options) == 1 else {"anyOf": options}


def constrained_body(body: dict[str, Any], engine: str, errors: list[str]) -> dict[str, Any] | None:
    """The request as one whose output the engine constrains to a valid call, or None when the engine
    cannot. The tools move into a system message (llama.cpp refuses a grammar beside `tools`)."""
    if engine not in CONSTRAINED_ENGINES or not tools_of(body):
        return None
    schema = call_schema(body)
    described = json.dumps([t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)],
                           ensure_ascii=False)
    system = ("You call tools by answering with one JSON object {\"name\": TOOL, \"arguments\": {...}}. Tools: "
              + described + (("\nYour last answer was wrong: " + "; ".join(errors[:4])) if errors else ""))
    out = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "parallel_tool_calls", "stream",
                                                      "stream_options", "response_format")}
    out["messages"] = [{"role": "system", "content": system}, *(body.get("messages") or [])]
    if engine in ("llama.cpp", "ik_llama"):
        out["json_schema"] = schema
    else:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema,
                                                                         "strict": True}}
    return out


def from_constrained(body: dict[str, Any], answer: Any) -> dict[str, Any] | None:
    """The constrained answer's JSON object as a proper tool call, if it passes; else None."""
    msg = message_of(answer)
    if msg is None or not isinstance(msg.get("content"), str):
        return None
    assert isinstance(answer, dict)
    values = _json_values(msg["content"])
    pairs = [pair for v in values[:1] for pair in _as_calls(v, tools_of(body))]
    if not pairs:
        return None
    out = with_calls(answer, [make_call(n, a) for n, a in pairs])
    return out if check(body, message_of(out) or {}).ok else None


# ---------------------------------------------------------------------- streaming

def chunks(answer: dict[str, Any]) -> list[bytes]:
    """A chat.completion as the SSE events of its stream: the role, the text or each call (name and
    arguments in one delta), the finish reason, [DONE]."""
    msg = message_of(answer) or {}
    choice0 = answer["choices"][0]
    base = {"id": answer.get("id", "chatcmpl-" + uuid.uuid4().hex[:24]), "object": "chat.completion.chunk",
            "created": answer.get("created", 0), "model": answer.get("model", "")}

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        data = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    out = [event({"role": "assistant", "content": None if msg.get("tool_calls") else ""})]
    if msg.get("content"):
        out.append(event({"content": msg["content"]}))
    for i, c in enumerate(msg.get("tool_calls") or []):
        out.append(event({"tool_calls": [{"index": i, "id": c.get("id"), "type": "function",
                                          "function": c.get("function")}]}))
    extra = {k: answer[k] for k in ("usage", "timings") if k in answer}
    out.append(event({}, choice0.get("finish_reason") or "stop", **extra))
    out.append(b"data: [DONE]\n\n")
    return out
