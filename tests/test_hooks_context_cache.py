"""
The SessionStart context cache of the hook command (claudectl.hooks.events):
when a cached text is reused, refreshed in the background or rebuilt, and
how the cache file stays bounded and survives damage.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hooks import events as E
from claudectl.hooks import runtime
from claudectl.hooks.files import HookHome
from tests.common import temp_home

NOW = 1_800_000_000


class OnlyNewKnowledgeTests(SynchronousTestCase):
    KEY = ["1.0", "proj", [[1], [2], [3], None], ["trust"]]

    def test_only_the_store_and_deliveries_may_differ(self) -> None:
        new = ["1.0", "proj", [[9], [8], [3], None], ["trust"]]
        self.assertTrue(E._only_new_knowledge(self.KEY, new))

    def test_anything_else_means_rebuild(self) -> None:
        for old in (
            None,
            "garbage",
            ["2.0", "proj", [[1], [2], [3], None], ["trust"]],  # another version
            ["1.0", "proj", [[1], [2], [4], None], ["trust"]],  # preferences changed
            ["1.0", "proj", [[1], [2], [3], None], ["other"]],  # trust changed
            ["1.0", "proj", [[1], [2]], ["trust"]],  # not the same files
            ["1.0", "proj", "stats", ["trust"]],
        ):
            self.assertFalse(E._only_new_knowledge(old, self.KEY), old)


class CacheFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = HookHome(str(temp_home(self).root))

    def cache(self) -> Any:
        with open(E._cache_path(self.home), "rb") as f:
            return json.loads(f.read())

    def test_damaged_cache_file_is_replaced(self) -> None:
        self.home.ensure_private_dir(self.home.hooks)
        with open(E._cache_path(self.home), "w") as f:
            f.write("[1, 2, 3]")
        self.assertIsNone(E._cache_entry(self.home, "proj"))
        E._store_context(self.home, ["v", "proj"], NOW, "text")
        self.assertEqual(
            self.cache(),
            {"proj": {"key": ["v", "proj"], "until": NOW + E.CONTEXT_CACHE_SECS, "text": "text"}},
        )
        with open(E._cache_path(self.home), "w") as f:
            f.write('{"proj": {"until": "soon", "text": "t"}}')
        self.assertIsNone(E._cache_entry(self.home, "proj"))

    def test_at_most_so_many_projects_oldest_dropped(self) -> None:
        for i in range(E.MAX_CACHED_PROJECTS + 2):
            E._store_context(self.home, ["v", f"p{i}"], NOW, f"text {i}")
        cache = self.cache()
        self.assertEqual(len(cache), E.MAX_CACHED_PROJECTS)
        self.assertNotIn("p0", cache)
        self.assertNotIn("p1", cache)
        self.assertEqual(
            cache[f"p{E.MAX_CACHED_PROJECTS + 1}"]["text"], f"text {E.MAX_CACHED_PROJECTS + 1}"
        )

    def test_unreadable_trust_file_counts_as_changed(self) -> None:
        path = self.home.hive + "/trust.json"
        self.assertIsNone(E._trust_key(path, NOW))
        self.home.ensure_private_dir(self.home.hive)
        with open(path, "w") as f:
            f.write("{broken")
        key = E._trust_key(path, NOW)
        self.assertIsInstance(key, list)  # the file's stat: any change to it counts


class SessionStartCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = HookHome(str(temp_home(self).root))
        self.payload = {"cwd": "/srv/proj", "hook_event_name": "SessionStart"}
        self.built: list[int] = []
        self.refreshed: list[Any] = []

        def build(payload: Any, home: Any, now: int, project: str) -> str:
            self.built.append(now)
            return f"## Hive Knowledge built at {now}"

        self.patch(E, "build_context", build)
        self.patch(E, "_refresh_detached", lambda *args: self.refreshed.append(args))
        # As under the real hook command when detach is set; never a real SIGALRM here.
        self.detach = False
        self.patch(runtime, "may_detach", lambda: self.detach)
        self.patch(runtime, "arm_deadline", lambda: None)

    def context(self, now: int) -> str | None:
        out = E.session_start(self.payload, self.home, now)
        return None if out is None else out["hookSpecificOutput"]["additionalContext"]

    def plant_new_knowledge_key(self) -> None:
        """Rewrite the cached key as if knowledge.jsonl had changed since."""
        with open(E._cache_path(self.home), "rb") as f:
            cache = json.loads(f.read())
        entry_ = cache["proj"]
        entry_["key"][2][0] = [0, 0, 0]
        with open(E._cache_path(self.home), "w") as f:
            f.write(json.dumps(cache))

    def test_reused_while_nothing_changed(self) -> None:
        first = self.context(NOW)
        self.assertEqual(self.context(NOW + 10), first)
        self.assertEqual(self.built, [NOW])

    def test_new_units_show_the_cached_text_and_refresh_it_in_the_background(self) -> None:
        first = self.context(NOW)
        self.plant_new_knowledge_key()
        self.detach = True
        self.assertEqual(self.context(NOW + 20), first)
        self.assertEqual(self.built, [NOW])
        self.assertEqual(len(self.refreshed), 1)

    def test_without_detaching_it_is_rebuilt_first(self) -> None:
        self.context(NOW)
        self.plant_new_knowledge_key()
        self.assertEqual(self.context(NOW + 20), f"## Hive Knowledge built at {NOW + 20}")
        self.assertEqual(self.refreshed, [])

    def test_too_stale_is_rebuilt(self) -> None:
        self.context(NOW)
        self.plant_new_knowledge_key()
        self.detach = True
        later = NOW + E.CONTEXT_CACHE_SECS + E.STALE_CONTEXT_SECS + 1
        self.assertEqual(self.context(later), f"## Hive Knowledge built at {later}")
        self.assertEqual(self.refreshed, [])

    def test_nothing_to_say_prints_nothing(self) -> None:
        self.patch(E, "build_context", lambda *args: "")
        self.assertIsNone(self.context(NOW))
