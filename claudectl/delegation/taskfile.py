# -*- test-case-name: tests.test_taskfile -*-
"""
Task files for ``claudectl run <file>``: claudectl's JSON format
(docs/delegation.md, Task files), and the same structure in YAML or TOML.

Everything is validated before anything starts: unknown keys (at both
levels), types, duplicate names, unknown dependencies, cycles, templates that
name anything but a dependency's ``stdout``, and peers that are not paired
(no ``peers/<peer>.key``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claudectl.delegation.text import cut_utf8
from claudectl.text import parse_problem

#: A dependency's output is cut to this many bytes before substitution.
MAX_TEMPLATE_BYTES = 32_768
TRUNCATION_NOTE = "\n... (truncated, output exceeded 32KB)"
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TOP_KEYS = {"tasks", "retries"}
_TASK_KEYS = {"name", "prompt", "cwd", "depends_on", "resume", "retries", "peer"}


class TaskFileError(Exception):
    """The task file cannot be run; the message says why."""


@dataclass(frozen=True)
class TaskDef:
    name: str
    prompt: str
    cwd: str | None = None
    depends_on: tuple[str, ...] = ()
    resume: str | None = None
    retries: int | None = None
    peer: str | None = None


@dataclass(frozen=True)
class TaskFile:
    tasks: tuple[TaskDef, ...]
    retries: int | None = None
    path: str = ""
    by_name: dict[str, TaskDef] = field(default_factory=dict, compare=False)

    def attempts(self, task: TaskDef) -> int:
        return max_attempts(self.retries, task.retries)


def max_attempts(file_retries: int | None, task_retries: int | None) -> int:
    """1 + (task retries, else file retries, else 0)."""
    retries = task_retries if task_retries is not None else file_retries
    return 1 + (retries or 0)


def slug(name: str) -> str:
    """claudectl's file-name form of a task name: ``API/Test #1`` -> ``apitest-1``."""
    out = []
    for c in name.lower():
        if c.isascii() and c.isalnum() or c in "-_":
            out.append(c)
        elif c.isspace():
            out.append("-")
    text = re.sub(r"-+", "-", "".join(out)).strip("-")
    return text or "task"


def expand_template(prompt: str, outputs: dict[str, str]) -> str:
    """Replace ``{{name.stdout}}`` with the (cut, trimmed) output of ``name``."""

    def sub(m: re.Match[str]) -> str:
        name, _, _field = m.group(1).partition(".")
        text, cut = cut_utf8(outputs.get(name.strip(), ""), MAX_TEMPLATE_BYTES)
        if cut:
            text += TRUNCATION_NOTE
        return text.strip()

    return _TEMPLATE.sub(sub, prompt)


def _parse_text(text: str, path: str) -> Any:
    suffix = Path(path).suffix.lower()
    if not text.strip():
        raise TaskFileError(f"{path}: the file is empty: nothing to run")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:  # each parser has its own error type
        raise TaskFileError(f"{path}: cannot parse: {parse_problem(e)}") from None


def _opt_int(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TaskFileError(f"{where}: retries must be a non-negative integer")
    return v


def _opt_str(v: Any, where: str, key: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise TaskFileError(f"{where}: {key} must be a string")
    return v


def parse(
    data: Any, path: str = "<tasks>", is_paired: Callable[[str], bool] | None = None
) -> TaskFile:
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: expected an object with a 'tasks' list")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise TaskFileError(
            f"{path}: unknown key(s) {', '.join(unknown)} (allowed: retries, tasks)"
        )
    if not isinstance(data.get("tasks"), list):
        raise TaskFileError(f"{path}: 'tasks' must be a list")
    if not data["tasks"]:
        raise TaskFileError(f"{path}: the 'tasks' list is empty: nothing to run")
    file_retries = _opt_int(data.get("retries"), path)
    tasks: list[TaskDef] = []
    for i, raw in enumerate(data["tasks"]):
        where = f"{path}: task {i + 1}"
        if not isinstance(raw, dict):
            raise TaskFileError(f"{where}: must be an object")
        unknown = sorted(set(raw) - _TASK_KEYS)
        if unknown:
            raise TaskFileError(
                f"{where}: unknown key(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(_TASK_KEYS))})"
            )
        name = raw.get("name")
        prompt = raw.get("prompt")
        if not isinstance(name, str) or not name:
            raise TaskFileError(f"{where}: 'name' is required (a string)")
        if not isinstance(prompt, str):
            raise TaskFileError(f"Task '{name}': 'prompt' is required (a string)")
        deps = raw.get("depends_on") or []
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise TaskFileError(f"Task '{name}': depends_on must be a list of task names")
        tasks.append(
            TaskDef(
                name=name,
                prompt=prompt,
                cwd=_opt_str(raw.get("cwd"), f"Task '{name}'", "cwd"),
                depends_on=tuple(deps),
                resume=_opt_str(raw.get("resume"), f"Task '{name}'", "resume"),
                retries=_opt_int(raw.get("retries"), f"Task '{name}'"),
                peer=_opt_str(raw.get("peer"), f"Task '{name}'", "peer"),
            )
        )
    by_name: dict[str, TaskDef] = {}
    for t in tasks:
        if t.name in by_name:
            raise TaskFileError(f"Duplicate task name: '{t.name}'")
        by_name[t.name] = t
    for t in tasks:
        for d in t.depends_on:
            if d not in by_name:
                raise TaskFileError(f"Task '{t.name}' depends on '{d}' which doesn't exist")
        for m in _TEMPLATE.finditer(t.prompt):
            name, dot, fld = m.group(1).partition(".")
            if not dot or fld.strip() != "stdout":
                raise TaskFileError(
                    f"Task '{t.name}': template {m.group(0)} is not supported "
                    f"(use {{{{<task>.stdout}}}})"
                )
            if name.strip() not in t.depends_on:
                raise TaskFileError(
                    f"Task '{t.name}': template {m.group(0)} names "
                    f"'{name.strip()}', which is not in its depends_on"
                )
        if t.peer is not None and is_paired is not None and not is_paired(t.peer):
            raise TaskFileError(
                f"Task '{t.name}': peer '{t.peer}' is not paired (no "
                f"peers/{t.peer}.key); pair it first or remove 'peer'"
            )
    cycle = _find_cycle(tasks, by_name)
    if cycle:
        raise TaskFileError("Task dependencies contain a cycle: " + " -> ".join(cycle))
    return TaskFile(tuple(tasks), file_retries, path, by_name)


def _find_cycle(tasks: list[TaskDef], by_name: dict[str, TaskDef]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for d in by_name[name].depends_on:
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return None

    for t in tasks:
        if t.name not in state:
            found = visit(t.name)
            if found:
                return found
    return None


def load(path: str | Path, is_paired: Callable[[str], bool] | None = None) -> TaskFile:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TaskFileError(f"{path}: cannot read: not UTF-8 text") from None
    return parse(_parse_text(text, path), path, is_paired)
