# -*- test-case-name: tests.test_hive_exchange -*-
"""
``hive export`` and ``hive import``: knowledge as a JSON (claudectl's form)
or YAML document.

An import is all or nothing: :func:`parse_document` validates every record
first and raises :class:`ImportProblem` naming the first bad one; only then
does :func:`import_units` merge the units under the store lock, through the
same rules as gossip (claudectl's import bypasses them, defect H17), so
local knowledge always wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from claudectl.config import HiveConfig
from claudectl.hive.merge import BatchResult, merge_batch, write_merge_logs
from claudectl.hive.store import store_transaction
from claudectl.hive.units import KnowledgeUnit, UnitError, dumps_pretty
from claudectl.home import Home
from claudectl.text import parse_problem


class ImportProblem(ValueError):
    """The document cannot be imported; nothing was changed."""


def export_json(units: Iterable[KnowledgeUnit]) -> str:
    """A pretty JSON array (2-space indent), as claudectl's ``hive export``."""
    return dumps_pretty([u.to_json() for u in units])


def export_yaml(units: Iterable[KnowledgeUnit]) -> str:
    return yaml.safe_dump(
        [u.to_json() for u in units], sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_document(data: bytes) -> list[KnowledgeUnit]:
    """
    Units from a JSON or YAML document: an array of units, an object with a
    ``units`` array, or a single unit.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImportProblem(f"the file is not UTF-8 text ({e})") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as json_error:
        if text.lstrip().startswith(("{", "[")):
            # Meant as JSON: the JSON parser's message says what is wrong.
            raise ImportProblem(f"the file is not valid JSON: {json_error}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ImportProblem(f"the file is neither JSON nor YAML: {parse_problem(e)}") from None
    if isinstance(doc, dict) and isinstance(doc.get("units"), list):
        records = doc["units"]
    elif isinstance(doc, dict) and "id" in doc:
        records = [doc]
    elif isinstance(doc, list):
        records = doc
    else:
        raise ImportProblem("expected an array of knowledge units")
    units = []
    for i, rec in enumerate(records, 1):
        try:
            units.append(KnowledgeUnit.from_json(rec))
        except UnitError as e:
            rid = rec.get("id") if isinstance(rec, dict) else None
            named = f" (id {rid})" if isinstance(rid, str) else ""
            raise ImportProblem(f"record {i}{named}: {e}") from None
    return units


def import_units(
    home: Home, units: list[KnowledgeUnit], *, local_id: str, config: HiveConfig, now: int
) -> BatchResult:
    """Merge ``units`` into the store and log conflicts and resolutions."""
    with store_transaction(home, local_id=local_id, config=config, now=now) as store:
        result = merge_batch(store, units, local_id, now, allow_local_origin=True)
    write_merge_logs(home, result, config.max_log_bytes)
    return result
