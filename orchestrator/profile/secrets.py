"""Values that look like secrets: an API key pasted where a variable's NAME belongs, or a token
written into env:. Detected by known prefixes and by shape (a long run that mixes letters and
digits), and never echoed back."""

from __future__ import annotations

import re

# Prefixes of keys and tokens that are published by their issuers (OpenAI/Anthropic sk-, Hugging Face
# hf_, GitHub ghp_/gho_/ghs_/github_pat_, GitLab glpat-, Slack xox?-, AWS AKIA/ASIA, JWTs eyJ).
_PREFIXES = re.compile(r"^(sk-|sk_|rk_|hf_[A-Za-z0-9]{8}|gh[opsur]_|github_pat_|glpat-|xox[abpr]-|AKIA[0-9A-Z]{8}|"
                       r"ASIA[0-9A-Z]{8}|eyJ[A-Za-z0-9_-]{8})")
_RUN = re.compile(r"[A-Za-z0-9+=]{16,}")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _mixed(run: str) -> bool:
    digits = sum(c.isdigit() for c in run)
    letters = sum(c.isalpha() for c in run)
    mixed_case = any(c.islower() for c in run) and any(c.isupper() for c in run)
    return (digits >= 2 and letters >= 2) or (mixed_case and len(run) >= 24)


def looks_like_secret(value: str) -> bool:
    """A key or token rather than a name or a setting: a known key prefix, or a run of 16+ characters
    (between separators) that mixes letters and digits, as random keys do."""
    if _PREFIXES.match(value):
        return True
    return any(_mixed(run) for run in _RUN.findall(value.replace("_", " ")))


def describe_secret(value: str) -> str:
    """What a refused value looks like, without any of it: its length and why it looks like a key."""
    kind = "it looks like an API key or token" if looks_like_secret(value) else "it is not a variable name"
    return f"{len(value)} characters; {kind}"
