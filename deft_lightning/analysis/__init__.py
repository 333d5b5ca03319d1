"""Mechanism analysis: token-level quantities (tokens.py) and the ``analyze`` figures (run.py)."""
