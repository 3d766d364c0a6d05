# -*- test-case-name: tests.test_tui_lines -*-
"""
Cleaning text that came from a peer before it reaches the terminal.

A peer chooses its identity's host part, task summaries, Claude Code's last
activity line and knowledge keys.  Any of them may carry terminal escape
sequences (cursor moves, title changes, OSC 52 clipboard writes) or bidi
overrides that make a line read differently than it is.  :func:`clean`
removes escape sequences whole, replaces every other control or format
character with ``?``, folds line breaks and tabs to spaces and bounds the
length.  (A shared cleaner is planned elsewhere; this one is local to the
dashboard until the two are unified.)
"""

from __future__ import annotations

import re
import unicodedata

#: CSI, OSC, DCS/PM/APC/SOS strings and two-byte ESC sequences, 7- and 8-bit.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])"  # OSC / DCS / SOS / PM / APC ...
    r".*?(?:\x07|\x1b\\|\x9c|$)"  # ... up to BEL or ST (or the end)
    r"|\x1b[@-Z\\-_]"  # other two-byte ESC sequences
    r"|\x1b",
    re.DOTALL,
)

#: Unicode categories never shown: controls, format characters (bidi
#: overrides, zero-width joiners), surrogates, private use, unassigned.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def clean(text: object, limit: int = 200) -> str:
    """``text`` made safe to draw on one terminal line, at most ``limit`` characters."""
    if text is None:
        return ""
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit * 8:
        s = s[: limit * 8]
    s = _ESCAPES.sub("", s)
    out = []
    for ch in s:
        if ch in "\t\n\r":
            out.append(" ")
        elif unicodedata.category(ch) in _HIDDEN:
            out.append("?")
        else:
            out.append(ch)
    result = "".join(out).strip()
    if len(result) > limit:
        result = result[: max(0, limit - 1)] + "…"
    return result
