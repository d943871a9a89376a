"""The user contract: the profile's schema (schema.py) and the loader that keeps line numbers
(loader.py). What the rest of the package uses is importable from here."""

from orchestrator.profile.loader import (
    LoadedProfile,
    Source,
    UnsafeReference,
    expand_path,
    json_schema,
    load,
    load_text,
    parse_yaml,
)
from orchestrator.profile.schema import Gateway, Hardware, Health, MemoryBudget, Model, Profile, Server, Speculative

__all__ = ["Gateway", "Hardware", "Health", "LoadedProfile", "MemoryBudget", "Model", "Profile", "Server", "Source", "Speculative", "UnsafeReference",
           "expand_path", "json_schema", "load", "load_text", "parse_yaml"]
