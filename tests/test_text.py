"""claudectl.text: peer text made safe for terminals and prompt lines."""

from __future__ import annotations

import json
import unicodedata

import pyte
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.text import _clean_passes, classic_log_text, clean_line, clean_text, json_safe

#: Characters no cleaned text may hold, besides the C0/C1 controls.
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Text biased towards what attacks are made of: escape sequence pieces,
# controls of every kind, bidi and line-separator characters.
hostile_chars = st.sampled_from(
    [
        "\x1b",
        "[",
        "]",
        "P",
        "\\",
        "\x07",
        "\x9b",
        "\x9c",
        "\x9d",
        "\x90",
        "0",
        ";",
        "2J",
        "m",
        "\r",
        "\n",
        "\t",
        "\x00",
        "\x7f",
        "\x85",
        "\u2028",
        "\u2029",
        "\u202e",
        "\u2066",
        "\U000e0041",
        "\ud800",
        "#",
        "a",
        "é",
        "中",
        "\u200d",
    ]
)
hostile_text = st.one_of(
    st.text(), st.lists(st.one_of(hostile_chars, st.text(max_size=3)), max_size=40).map("".join)
)


def _controls(text: str) -> set[str]:
    return {
        c
        for c in text
        if unicodedata.category(c) in ("Cc", "Cs")
        or c in BIDI
        or 0xE0000 <= ord(c) <= 0xE007F
        or c in "\u2028\u2029"
    }


class CleanTextTests(SynchronousTestCase):
    def test_escape_sequences_go_whole(self) -> None:
        cases = {
            "a\x1b[2Jb": "ab",  # clear screen (CSI)
            "a\x1b[38;5;196mred\x1b[0m": "ared",  # colours
            "x\x1b]0;owned\x07y": "xy",  # window title (OSC, BEL)
            "x\x1b]2;owned\x1b\\y": "xy",  # window title (OSC, ST)
            "x\x1b]8;;http://evil\x1b\\": "x",  # hyperlink, unterminated after
            "x\x1bP+q544e\x1b\\y": "xy",  # DCS
            "a\x9b2Jb": "ab",  # 8-bit CSI
            "a\x9d0;t\x9cb": "ab",  # 8-bit OSC
            "e\x1bc": "e",  # full reset
            "e\x1b(Bz": "ez",
            "trailing\x1b": "trailing",
        }
        for raw, want in cases.items():
            self.assertEqual(clean_text(raw), want, repr(raw))

    def test_controls_bidi_tags_and_surrogates_dropped(self) -> None:
        self.assertEqual(
            clean_text("a\x00b\x08c\x7fd\x91e\x9fz"), "abcde"
        )  # \x9f (APC) runs to the end
        self.assertEqual(clean_text("evil\u202eexe.txt"), "evilexe.txt")
        self.assertEqual(clean_text("\u2066x\u2069\u200f"), "x")
        self.assertEqual(clean_text("hi\U000e0049\U000e0047"), "hi")  # invisible tag text
        self.assertEqual(clean_text("a\ud800b"), "ab")

    def test_line_breaks(self) -> None:
        self.assertEqual(clean_text("a\r\nb\rc\nd\u2028e\x85f\x0bg\tt"), "a\nb\nc\nd\ne\nf\ng\tt")
        self.assertEqual(clean_line("a\r\nb\n## Fake\tc\u2029d"), "a b ## Fake c d")

    def test_ordinary_unicode_unchanged(self) -> None:
        for text in (
            "café 中文 日本語",
            "emoji 👨\u200d👩\u200d👧 ok",
            "Ελληνικά — “quotes”",
            "[Bash, cargo test] approve (95%)",
            "",
        ):
            self.assertEqual(clean_text(text), text)
            self.assertEqual(clean_line(text), text)

    def test_non_strings(self) -> None:
        self.assertEqual(clean_line(12), "12")
        self.assertEqual(clean_line(None), "None")

    @given(hostile_text)
    def test_no_control_or_escape_survives(self, text: str) -> None:
        out = clean_text(text)
        self.assertEqual(_controls(out) - {"\n", "\t"}, set())
        self.assertNotIn("\x1b", out)
        line = clean_line(text)
        self.assertEqual(_controls(line), set())
        self.assertNotIn("\n", line)
        # Cleaning is idempotent, and the single-line form is the cleaned
        # text on one line.
        self.assertEqual(clean_text(out), out)
        self.assertEqual(line, out.replace("\n", " ").replace("\t", " "))

    def test_ascii_fast_path_same_as_the_passes(self) -> None:
        # Clean ASCII text skips the three passes: every ASCII character, in
        # every position, gives what the passes give.
        for n in range(128):
            c = chr(n)
            for text in (c, f"a{c}b", f"{c}[31mx", f"x\x1b{c}", f"line{c}\n"):
                self.assertEqual(clean_text(text), _clean_passes(text), repr(text))

    @given(st.text(alphabet=st.characters(max_codepoint=127)))
    def test_ascii_text_same_as_the_passes(self, text: str) -> None:
        self.assertEqual(clean_text(text), _clean_passes(text))

    @given(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp")).filter(
                # The tag block is removed whole; its unassigned U+E0000 is not Cf.
                lambda c: not 0xE0000 <= ord(c) <= 0xE007F
            )
        )
    )
    def test_printable_text_passes(self, text: str) -> None:
        self.assertEqual(clean_line(text), text)

    @given(hostile_text)
    def test_terminal_screen_untouched(self, text: str) -> None:
        """On an emulated terminal, cleaned text never moves the cursor up,
        clears anything or sets the title."""
        screen = pyte.Screen(80, 24)
        stream = pyte.Stream(screen)
        stream.feed("KEEP\r\n")
        stream.feed(clean_line(text)[:500])  # never enough to scroll KEEP away
        self.assertEqual(screen.display[0].rstrip(), "KEEP")
        self.assertEqual(screen.title, "")
        self.assertGreaterEqual(screen.cursor.y, 1)

    @given(
        st.recursive(
            st.none() | st.booleans() | hostile_text,
            lambda kids: (
                st.lists(kids, max_size=3) | st.dictionaries(hostile_text, kids, max_size=3)
            ),
            max_leaves=10,
        )
    )
    def test_json_safe_keeps_the_data(self, value: object) -> None:
        encoded = json.dumps(value, indent=2, ensure_ascii=False)
        safe = json_safe(encoded)
        self.assertEqual(json.loads(safe), value)
        self.assertEqual(_controls(safe) - {"\n"}, set())


class CleanWriterTests(SynchronousTestCase):
    def test_log_observer_of_the_foreground_service(self) -> None:
        """`relay serve` logs to the terminal: events carrying peer text are cleaned."""
        import io

        from twisted.logger import Logger

        from claudectl.cli.relay_cmds import _clean_stdout_observer

        out = io.StringIO()
        self.patch(__import__("sys"), "stdout", out)
        observer = _clean_stdout_observer()
        Logger(observer=observer).info(
            "task from {peer}: {summary}", peer="w-1", summary="ok\x1b]0;pwned\x07\x1b[2J\u202e"
        )
        text = out.getvalue()
        self.assertIn("task from w-1: ok", text)
        self.assertEqual(_controls(text) - {"\n"}, set())
        # Debug events are not written (nor formatted): issue 16.
        Logger(observer=observer).debug("dropped connection from {ip}", ip="203.0.113.9")
        self.assertNotIn("203.0.113.9", out.getvalue())
        # Info and up are: warn, error, critical too, each a line of its own.
        for level in ("warn", "error", "critical"):
            getattr(Logger(observer=observer), level)("level {name}", name=level)
            self.assertIn(f"#{level}] level {level}\n", out.getvalue())


class ClassicLogTextTests(SynchronousTestCase):
    """The service's log lines are Twisted's own, character for character."""

    def test_same_as_twisted(self) -> None:
        from twisted.logger import LogLevel, formatEventAsClassicLogText
        from twisted.python.failure import Failure

        failure = Failure(ZeroDivisionError("division by zero"))

        class Obj:
            name = "attr"

            def hello(self) -> str:
                return "called"

        base = {"log_time": 1_765_000_000.75, "log_level": LogLevel.info, "log_namespace": "ns"}
        events = [
            {
                "log_format": "{peer_id} authenticated ({direction}, {mode})",
                "peer_id": "p-1",
                "direction": "inbound",
                "mode": "mutual",
            },
            {
                "log_format": "{p} after {secs:.1f} s: {reason!r}",
                "p": "x",
                "secs": 2.345,
                "reason": "bye",
            },
            {"log_format": "two\nlines {x}", "x": "a\nb"},
            {"log_format": "{o.name} {o.hello()} {l[0]}", "o": Obj(), "l": ["zero"]},
            {"log_format": "missing {nope}"},
            {"log_format": "literal {{braces}}"},
            {"log_format": ""},
            {"log_format": "failed", "log_failure": failure},
            {"log_format": "sys", "log_system": "custom"},
            {"no_format": 1},
        ]
        for extra in events:
            for when in (1_765_000_000.75, 1_765_000_000.99, 1_765_000_001.0):
                event = {**base, "log_time": when, **extra}
                self.assertEqual(
                    classic_log_text(dict(event)), formatEventAsClassicLogText(dict(event)), extra
                )
        no_level = {"log_format": "x", "log_time": 1.5}
        self.assertEqual(classic_log_text(no_level), formatEventAsClassicLogText(no_level))
