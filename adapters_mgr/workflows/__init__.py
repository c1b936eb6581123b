"""Workflows: what the manager does, as functions over a small Workspace (never the manager)."""
