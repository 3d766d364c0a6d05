# -*- test-case-name: tests.test_taskfile -*-
"""Text helpers shared by the delegation modules."""

from __future__ import annotations


def cut_utf8(text: str, max_bytes: int) -> tuple[str, bool]:
    """
    ``text`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a
    character (claudectl panics there, defect D14).  Returns the text and
    whether anything was cut.
    """
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, False
    # errors="ignore" drops the partial character at the cut.
    return data[:max_bytes].decode("utf-8", "ignore"), True
