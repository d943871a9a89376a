"""Runtimes that run a Plan on this machine: process and docker (one `Runtime` each, runtime/base.py),
driven by the Deployer, with state that survives crashes."""
