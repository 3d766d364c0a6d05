# -*- test-case-name: tests.test_tui_lines -*-
"""
Cleaning text that came from a peer before it reaches the terminal.

A peer chooses its identity's host part, task summaries, Claude Code's last
activity line and knowledge keys.  Any of them may carry terminal escape
sequences (cursor moves, title changes, OSC 52 clipboard writes) or bidi
overrides that make a line read differently than it is.  :func:`clean` is
the project's one cleaner (:func:`claudectl.text.clean_line`: escape
sequences removed whole, other control and format characters dropped, line
breaks and tabs folded to spaces) plus a bound on the length of one
dashboard cell.
"""

from __future__ import annotations

from claudectl.text import clean_line


def clean(text: object, limit: int = 200) -> str:
    """``text`` made safe to draw on one terminal line, at most ``limit`` characters."""
    if text is None:
        return ""
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit * 8:
        s = s[: limit * 8]
    result = clean_line(s).strip()
    if len(result) > limit:
        result = result[: max(0, limit - 1)] + "…"
    return result
