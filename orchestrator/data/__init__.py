"""Data files shipped with orchestrator (the evaluation text of `orchestrate eval`)."""
