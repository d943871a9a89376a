"""Runtimes that run a Plan: process (here), docker (later), with state that survives crashes."""
