# -*- test-case-name: tests.test_hooks_redact -*-
"""
Secrets out of recorded commands.

The hooks record the commands a user allows or denies in
``decisions.jsonl``; that log is distilled into knowledge that may be shared
with peers.  :func:`redact` replaces what looks like a secret with ``***``
before anything is written (docs/claude-code.md, "What is recorded"):

1. credentials in URLs: ``scheme://user:pass@host`` → ``scheme://***@host``;
2. the value of a long option whose name has a word such as ``password``,
   ``passwd``, ``pass``, ``pwd``, ``token``, ``secret``, ``auth``,
   ``apikey``/``api-key``, ``credential(s)`` (``--token X``,
   ``--client-secret=X``, ``--auth-token X``);
3. ``-p<value>`` / ``-p <value>`` after ``mysql``, ``mysqldump``,
   ``mysqladmin``, ``mariadb`` and ``sshpass`` (elsewhere ``-p`` is a port
   or a flag, as in ``mkdir -p``), and the password part of
   ``-u user:pass`` / ``--user user:pass`` (curl);
4. environment assignments whose upper-case name has ``TOKEN``, ``SECRET``,
   ``PASSWORD``, ``PASSWD``, ``PASS``, ``PWD``, ``KEY``, ``AUTH`` or
   ``CREDENTIAL`` in it (``GITHUB_TOKEN=...``, ``export AWS_SECRET_ACCESS_KEY=...``);
5. ``Authorization:``-style header values (``Bearer xyz`` → ``Bearer ***``);
6. well-known token shapes (``ghp_…``, ``github_pat_…``, ``sk-…``,
   ``xoxb-…``, ``AKIA…``) and any other run of 24 or more characters from
   ``[A-Za-z0-9+=_.-]`` that mixes letters and digits with an entropy of at
   least 3.5 bits per character (keys, tokens -- and, by design, long hex
   hashes).

The text is then capped at :data:`MAX_COMMAND_CHARS`.  Pure functions, no
I/O: used on the hook path.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter

MASK = "***"
MAX_COMMAND_CHARS = 2000

_SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "pwd", "token", "secret", "auth", "apikey", "credential"}
)
_SECRET_WORDS |= {"credentials", "passphrase"}
_SECRET_NAMES = frozenset({"api-key", "api_key", "access-key", "private-key", "secret-key"})
_NOT_A_VALUE = frozenset({"stdin", "file", "path", "env", "cmd", "command", "helper"})
_P_PROGRAMS = frozenset({"mysql", "mysqldump", "mysqladmin", "mariadb", "sshpass"})

_URL_CREDS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_ENV_ASSIGN = re.compile(
    r"(?<![A-Za-z0-9_])(?P<name>[A-Z_][A-Z0-9_]*"
    r"(?:TOKEN|SECRET|PASSWORD|PASSWD|PASS|PWD|KEY|AUTH|CREDENTIAL)[A-Z0-9_]*)="
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&|]+)"
)
_HEADER = re.compile(
    r"(?i)(?P<name>\b(?:proxy-)?authorization|\bx-api-key|\bapi-key|\bprivate-token|\bx-auth-token)"
    r"(?P<sep>\s*:\s*)(?P<kind>(?:bearer|basic|token|bot)\s+)?(?P<value>[^\s'\"]+)"
)
_KNOWN_TOKENS = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}|sk-[A-Za-z0-9_-]{16,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})"
)
_LONG_RUN = re.compile(r"[A-Za-z0-9+=_.-]{24,}")


def entropy(text: str) -> float:
    """Shannon entropy of ``text`` in bits per character."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _looks_random(run: str) -> bool:
    has_alpha = any(ch.isalpha() for ch in run)
    has_digit = any(ch.isdigit() for ch in run)
    return has_alpha and has_digit and entropy(run) >= 3.5


def _secret_option(name: str) -> bool:
    """Is ``--name`` an option whose value is a secret?"""
    name = name.lower()
    if name in _SECRET_NAMES:
        return True
    parts = re.split(r"[-_]", name)
    # --password-stdin, --token-file: a flag or a path, not the secret itself.
    if parts[-1] in _NOT_A_VALUE:
        return False
    return any(part in _SECRET_WORDS for part in parts)


def _redact_words(command: str) -> str:
    """Rules 2 and 3, on the shell words of ``command`` (kept as written)."""
    # Work on the original text: find each word's span, replace values in place.
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:  # unbalanced quotes: fall back to plain splitting
        words = command.split()
    secrets: list[str] = []
    program = ""
    expect_value = False
    for i, word in enumerate(words):
        if expect_value:
            secrets.append(word)
            expect_value = False
            continue
        if word in (";", "&&", "||", "|", "&"):
            program = ""
            continue
        if not program and "=" not in word:
            program = word.rsplit("/", 1)[-1]
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word[2:].partition("=")
            if name in ("user",) or not _secret_option(name):
                if name == "user":
                    if eq and ":" in value:
                        secrets.append(value.split(":", 1)[1])
                    elif not eq and i + 1 < len(words) and ":" in words[i + 1]:
                        secrets.append(words[i + 1].split(":", 1)[1])
                continue
            if eq:
                if value:
                    secrets.append(value)
            else:
                expect_value = True
            continue
        if word == "-u" and i + 1 < len(words) and ":" in words[i + 1]:
            secrets.append(words[i + 1].split(":", 1)[1])
            continue
        if program in _P_PROGRAMS and word.startswith("-p"):
            if len(word) > 2:
                secrets.append(word[2:])
            else:
                expect_value = True
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret and secret != MASK:
            # Whole words only (after a space, =, :, a quote or -p).
            command = re.sub(
                r"(?:(?<=[\s=:'\"])|(?<=-p))" + re.escape(secret) + r"(?=$|[\s'\";&|])",
                MASK,
                command,
            )
    return command


def redact(command: str) -> str:
    """``command`` with the secrets of the module's rules replaced by ``***``."""
    text = _URL_CREDS.sub(lambda m: m.group("scheme") + MASK + "@", command)
    text = _HEADER.sub(
        lambda m: m.group("name") + m.group("sep") + (m.group("kind") or "") + MASK, text
    )
    text = _ENV_ASSIGN.sub(lambda m: m.group("name") + "=" + MASK, text)
    text = _redact_words(text)
    text = _KNOWN_TOKENS.sub(MASK, text)
    text = _LONG_RUN.sub(lambda m: MASK if _looks_random(m.group(0)) else m.group(0), text)
    if len(text) > MAX_COMMAND_CHARS:
        text = text[: MAX_COMMAND_CHARS - 1] + "\u2026"
    return text
