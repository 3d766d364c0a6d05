"""Helpers for running child processes (Claude Code) safely."""
