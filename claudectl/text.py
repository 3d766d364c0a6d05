# -*- test-case-name: tests.test_text -*-
"""
Cleaning text that came from a peer before anyone reads it.

Every peer is a possible attacker, and what it sends ends up on terminals
(``hive knowledge``, ``relay status``, ``relay discover``) and in the brain
prompt (``hive prompt``).  Raw, its text could clear the screen, retitle the
window, hide or reorder words (bidi overrides), or start a fake ``## ...``
section of the prompt with a newline.  Stored data is kept as it arrived;
text is cleaned where it is shown:

* :func:`clean_text` -- for multi-line output: drops whole escape sequences
  (CSI, OSC, DCS/SOS/PM/APC, two-character ESC sequences, their 8-bit C1
  forms), every other C0/C1 control character and DEL, bidi embedding /
  override / isolate / mark characters, Unicode tag characters (invisible
  text) and lone surrogates.  Line breaks (``\\r\\n``, ``\\r``, ``\\v``,
  ``\\f``, NEL, U+2028, U+2029) become ``\\n``; tabs are kept.  Ordinary
  Unicode (accents, CJK, emoji with their joiners) passes unchanged.
* :func:`clean_line` -- the same, and every line break and tab becomes a
  space: for one line of the prompt, a table cell, a ``Label: value`` line.
* :class:`CleanWriter` -- a stream wrapper for log observers that write to
  a terminal (the foreground ``relay serve``).
* :func:`json_safe` -- for JSON already encoded with ``ensure_ascii=False``:
  writes the same characters as ``\\uXXXX`` escapes instead, so the data is
  unchanged for a JSON reader and nothing reaches the terminal raw.
"""

from __future__ import annotations

import re
from typing import IO, Any, cast

# Whole escape sequences, 7-bit (ESC ...) and 8-bit (C1) forms.  An
# unterminated string sequence (OSC, DCS, ...) runs to the end of the text,
# as a terminal would swallow it.
_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, ends BEL or ST
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS SOS PM APC
    r"|\x1b[ -/]*[0-~]?"  # other ESC sequences, lone ESC
)

_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\x85\u2028\u2029]")

#: What is dropped once the sequences are gone: C0 controls but tab and
#: newline, DEL, C1, bidi marks / embeddings / overrides / isolates, tag
#: characters, lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff\U000e0000-\U000e007f]"
)

#: In ASCII text, what any of the three patterns above would touch (every
#: control but tab and newline, and DEL): text without one is already clean.
_ASCII_DIRTY = re.compile("[\x00-\x08\x0b-\x1f\x7f]")

#: Characters :func:`json_safe` writes as escapes (ASCII controls are escaped
#: by the JSON encoder itself).
_JSON_UNSAFE = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff\U000e0000-\U000e007f]"
)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def clean_text(value: object) -> str:
    """``value`` (a string, else its ``str()``) safe to print; newlines and tabs kept."""
    text = _text(value)
    if text.isascii() and _ASCII_DIRTY.search(text) is None:
        return text  # the common case (a log line): one scan instead of three passes
    return _clean_passes(text)


def _clean_passes(text: str) -> str:
    """What :func:`clean_text` does to text that may need it."""
    text = _SEQUENCES.sub("", text)
    text = _BREAKS.sub("\n", text)
    return _UNSAFE.sub("", text)


def clean_line(value: object) -> str:
    """Like :func:`clean_text`, but on one line: line breaks and tabs become spaces."""
    return clean_text(value).replace("\n", " ").replace("\t", " ")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    n = ord(ch)
    if n > 0xFFFF:  # a UTF-16 surrogate pair, as JSON spells it
        n -= 0x10000
        return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
    return f"\\u{n:04x}"


def json_safe(encoded: str) -> str:
    """
    JSON text (from ``json.dumps(..., ensure_ascii=False)``) with C1 controls,
    DEL, bidi controls, line separators, tag characters and lone surrogates
    written as ``\\uXXXX`` escapes.  They can only occur inside JSON strings,
    so the result decodes to the same value.
    """
    return _JSON_UNSAFE.sub(_escape, encoded)


class CleanWriter:
    """A text stream whose every write goes through :func:`clean_text`
    (for log observers that write to a terminal)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    @classmethod
    def wrap(cls, stream: IO[str]) -> IO[str]:
        """``stream`` cleaned, typed as the stream it stands for."""
        return cast(IO[str], cls(stream))

    def write(self, text: str) -> int:
        return self._stream.write(clean_text(text))

    def flush(self) -> None:
        self._stream.flush()


#: (whole second, its RFC 3339 text) of the last log event formatted.
_log_second: list[Any] = [None, ""]


def classic_log_text(event: dict[str, Any]) -> str | None:
    """
    ``twisted.logger.formatEventAsClassicLogText``, character for character,
    in a tenth of the time or less for the events a service logs per link:
    a plain format (``{name}``, ``{secs:.1f}``) goes through ``str.format_map``
    and the timestamp is made once per second.  Anything else (a traceback, a
    ``{call()}`` or ``{a[0]}`` field, a field that fails) is Twisted's own.
    """
    fmt = event.get("log_format")
    when = event.get("log_time")
    level = event.get("log_level")
    if (
        type(fmt) is str
        and type(when) is float
        and level is not None
        and "log_failure" not in event
        and "log_system" not in event
        and "()" not in fmt
        and "[" not in fmt
    ):
        try:
            text = fmt.format_map(event)
        except Exception:
            text = None
        if text is not None:
            if not text:
                return None
            second = int(when)
            if _log_second[0] != second:
                from twisted.logger import formatTime

                _log_second[1] = formatTime(when)
                _log_second[0] = second
            system = f"{event.get('log_namespace', '-')}#{level.name}"
            line = f"{_log_second[1]} [{system}] {text}"
            return line.replace("\n", "\n\t") + "\n"
    from twisted.logger import formatEventAsClassicLogText

    return formatEventAsClassicLogText(event)


__all__ = ["clean_text", "clean_line", "json_safe", "CleanWriter", "classic_log_text"]


def ago(epoch: object, now: float) -> str:
    """How long ago ``epoch`` (Unix seconds) was: ``12s ago``, ``3m ago`` … or ``never``."""
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not epoch:
        return "never"
    delta = max(0, int(now - epoch))
    if delta < 60:
        return f"{delta}s ago"
    if delta < 3600:
        return f"{delta // 60}m ago"
    if delta < 86400:
        return f"{delta // 3600}h ago"
    return f"{delta // 86400}d ago"


def parse_problem(error: BaseException) -> str:
    """A parser's complaint on one line: YAML's problem and where it is, else its text."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return clean_line(str(error) or type(error).__name__)
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return clean_line(problem)
    return f"{clean_line(problem)} (line {mark.line + 1}, column {mark.column + 1})"


def shorten(text: str, limit: int) -> str:
    """``text`` on one line (whitespace runs as one space), at most ``limit`` characters."""
    text = " ".join(text.split())
    if len(text) > limit:
        return text[: limit - 1] + "\u2026"
    return text
