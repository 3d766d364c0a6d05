"""Encoded answers to knowledge_request: what they hold, per peer, and when they are made again."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config, HiveConfig
from claudectl.hive.answers import AnswerCache, Encoded, Page, pages_of
from claudectl.hive.gossip import Gossip
from claudectl.hive.sharing import EXPOSURE, HIDE, ShareContext, ShareContexts, set_exposure
from claudectl.hive.trust import trust_transaction
from claudectl.hive.units import DAY, KnowledgeUnit, paginate
from claudectl.relay import codec
from tests.common import FakeMesh, temp_home
from tests.test_gossip import NOW, put, unit_json


def unit(uid: str, source: str, **kw: Any) -> dict[str, Any]:
    """A unit whose command (so its semantic key) is its own: the store keeps them apart."""
    kw.setdefault("cmd", f"cmd {uid}")
    return unit_json(uid, source, **kw)


def units_of(*records: dict[str, Any]) -> list[KnowledgeUnit]:
    return [KnowledgeUnit.from_json(r) for r in records]


def consented(record: dict[str, Any], **consent: Any) -> dict[str, Any]:
    return dict(record, sharing_consent={"min_trust_tier": "any", **consent})


class AnswerCacheTests(SynchronousTestCase):
    """The cache against a real ShareContext and real units (no engine)."""

    def setUp(self) -> None:
        self.cache = AnswerCache()
        self.ctx = ShareContext("me-1", HiveConfig())

    def select(self, units: list[KnowledgeUnit], peer: str, now: int = NOW) -> Any:
        def go() -> list[Encoded]:
            return [(u, u.wire_size) for u in self.ctx.shareable_units(units, peer, now)]

        return go

    def ids(self, store: list[KnowledgeUnit], peer: str, now: int = NOW) -> list[str]:
        answer = self.cache.answer(peer, store, self.ctx, now, self.select(store, peer, now))
        return [u.id for u, _ in answer.units]

    def test_the_second_answer_comes_from_the_cache(self) -> None:
        store = units_of(unit("ku_1", "me-1"), unit("ku_2", "peer-x"))
        first = self.cache.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a"))
        again = self.cache.answer(
            "peer-a", store, self.ctx, NOW, lambda: self.fail("selected again")
        )
        self.assertIs(again, first)
        self.assertIs(again.pages[0], first.pages[0])
        self.assertEqual((self.cache.built, self.cache.hits), (1, 1))

    def test_a_new_store_or_context_is_selected_again(self) -> None:
        store = units_of(unit("ku_1", "me-1"))
        self.assertEqual(self.ids(store, "peer-a"), ["ku_1"])
        # The gossip engine's store is a new list after every change.
        newer = units_of(unit("ku_1", "me-1"), unit("ku_2", "me-1"))
        self.assertEqual(self.ids(newer, "peer-a"), ["ku_1", "ku_2"])
        # A new context (trust.json, exposure.json or the config changed).
        self.ctx = ShareContext("me-1", HiveConfig(), exposure={"ku_2": HIDE})
        self.assertEqual(self.ids(newer, "peer-a"), ["ku_1"])
        self.assertEqual(self.cache.built, 3)

    def test_each_peer_gets_what_its_own_rules_allow(self) -> None:
        store = units_of(
            unit("ku_all", "me-1"),
            consented(unit("ku_only_a", "me-1"), allow_peers=["peer-a"]),
            consented(unit("ku_not_a", "me-1"), exclude_peers=["peer-a"]),
            unit("ku_from_b", "peer-b"),
        )
        for order in (["peer-a", "peer-b", "peer-c"], ["peer-c", "peer-b", "peer-a"]):
            self.cache.clear()
            got = {p: self.ids(store, p) for p in order}
            # ... and asked a second time, from the cache.
            self.assertEqual({p: self.ids(store, p) for p in order}, got)
            self.assertEqual(got["peer-a"], ["ku_all", "ku_only_a", "ku_from_b"])
            # Not what only A may have, nor its own unit back.
            self.assertEqual(got["peer-b"], ["ku_all", "ku_not_a"])
            self.assertEqual(got["peer-c"], ["ku_all", "ku_not_a", "ku_from_b"])

    def test_peers_with_the_same_units_share_one_encoded_answer(self) -> None:
        store = units_of(unit("ku_1", "me-1"), unit("ku_2", "peer-b"))
        a = self.cache.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a"))
        c = self.cache.answer("peer-c", store, self.ctx, NOW, self.select(store, "peer-c"))
        b = self.cache.answer("peer-b", store, self.ctx, NOW, self.select(store, "peer-b"))
        self.assertIs(a, c)
        self.assertIsNot(a, b)
        self.assertEqual(self.cache.built, 2)

    def test_an_answer_lasts_until_its_first_unit_expires(self) -> None:
        self.ctx = ShareContext("me-1", HiveConfig(knowledge_ttl_days=1))
        store = units_of(
            unit("ku_old", "me-1", validated=NOW - 100),
            unit("ku_new", "me-1", cmd="make", validated=NOW),
            consented(unit("ku_consent", "me-1", cmd="ls", validated=NOW), expires_at=NOW + 500),
        )
        for now, ids, built in [
            (NOW, ["ku_old", "ku_new", "ku_consent"], 1),
            (NOW + 500, ["ku_old", "ku_new", "ku_consent"], 1),
            (NOW + 501, ["ku_old", "ku_new"], 2),  # the consent expired
            (NOW - 100 + DAY, ["ku_old", "ku_new"], 2),
            (NOW - 99 + DAY, ["ku_new"], 3),  # ku_old is older than the TTL
        ]:
            self.assertEqual(self.ids(store, "peer-a", now), ids, now - NOW)
            self.assertEqual(self.cache.built, built, now - NOW)

    def test_bounded_in_bytes_and_peers(self) -> None:
        store = units_of(*(unit(f"ku_{i}", "me-1", cmd="x" * 1000) for i in range(10)))
        small = AnswerCache(max_bytes=5_000)
        got = [small.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a"))]
        got.append(small.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a")))
        # Too big to keep encoded: the selection is kept, the pages made each time.
        self.assertEqual(small.built, 1)
        self.assertIs(got[0], got[1])
        first, again = got[0].pages, got[1].pages
        self.assertIsNot(first, again)
        self.assertEqual([p.units for p in first], [p.units for p in again])
        # Kept for another peer past the peer limit: counted as a selection.
        one = AnswerCache(max_bytes=5_000, max_peers=1)
        for p in ("peer-a", "peer-b"):
            kept = one.answer(p, store, self.ctx, NOW, self.select(store, p))
        self.assertEqual(one._bytes, kept.cost)
        self.assertLess(kept.cost, kept.nbytes)
        tiny = AnswerCache(max_bytes=1_000)  # not even the selection fits
        for _ in range(2):
            tiny.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a"))
        self.assertEqual(tiny.built, 2)
        # Two answers that do not fit together: the first is let go.
        two = AnswerCache(max_bytes=1_700 * 7)
        two.answer("peer-a", store, self.ctx, NOW, lambda: self.select(store, "peer-a")()[:6])
        two.answer("peer-b", store, self.ctx, NOW, lambda: self.select(store, "peer-b")()[:5])
        self.assertEqual(list(two._by_peer), ["peer-b"])
        few = AnswerCache(max_peers=2)
        for p in ("peer-a", "peer-b", "peer-c", "peer-a"):
            few.answer(p, store, self.ctx, NOW, self.select(store, p))
        self.assertLessEqual(len(few._by_peer), 2)

    def test_pages_are_claudectls_byte_for_byte(self) -> None:
        # Units of ~40 KB: 13 fit a 512,000-byte page.
        store = units_of(
            *(unit(f"ku_{i}", "me-1", cmd=f"{i} caf\u00e9 " + "x" * 40_000) for i in range(30))
        )
        answer = self.cache.answer("peer-a", store, self.ctx, NOW, self.select(store, "peer-a"))
        self.assertEqual([len(p) for p in answer.pages], [len(p) for p in paginate(store)])
        for n, page in enumerate(answer.pages, 1):
            head = {"page": n, "total_pages": len(answer.pages)}
            payload = page.payload(head)
            env = codec.Envelope("msg_1_2", codec.KNOWLEDGE_SNAPSHOT, "me-1", 12, payload)
            plain = {**head, "units": [u.to_json() for u, _ in page.units]}
            self.assertEqual(
                codec.encode(env),
                codec.encode(dataclasses.replace(env, payload=json.loads(json.dumps(plain)))),
            )
            self.assertEqual(payload.raw, payload.json.encode("utf-8"))

    def test_an_empty_answer_is_one_empty_page(self) -> None:
        answer = self.cache.answer("peer-a", [], self.ctx, NOW, lambda: [])
        [page] = answer.pages
        self.assertEqual(
            page.payload({"page": 1, "total_pages": 1}).json,
            '{"page":1,"total_pages":1,"units":[]}',
        )
        self.assertEqual(pages_of([]), [])
        self.assertEqual(len(Page([])), 0)


class ShareContextsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.config = HiveConfig()
        self.contexts = ShareContexts(self.home, "me-1")

    def test_loaded_again_only_on_change(self) -> None:
        first = self.contexts.get(self.config)
        self.assertIs(self.contexts.get(self.config), first)
        set_exposure(self.home, "ku_1", HIDE)
        second = self.contexts.get(self.config)
        self.assertIsNot(second, first)
        self.assertEqual(dict(second.exposure), {"ku_1": HIDE})
        with trust_transaction(self.home) as book:
            book.ensure("peer-a", NOW).trust_level = 0.9
        third = self.contexts.get(self.config)
        self.assertIsNot(third, second)
        self.assertEqual(third.trust.rank("peer-a"), third.trust.tier("peer-a").rank)
        self.assertGreater(third.trust.level("peer-a"), 0.8)
        # Another config object, or a change notice.
        self.assertIsNot(self.contexts.get(HiveConfig()), third)
        fourth = self.contexts.get(self.config)
        self.contexts.invalidate(EXPOSURE)
        self.assertIsNot(self.contexts.get(self.config), fourth)
        self.assertEqual(self.contexts.loads, 6)


class EngineAnswerTests(SynchronousTestCase):
    """The gossip engine's answers follow every change of what they depend on."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.mesh = FakeMesh("me-1")
        self.gossip = self.make()
        self.mesh.connect("peer-a")
        self.mesh.connect("peer-b")

    def make(self, **hive: Any) -> Gossip:
        config = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), **hive))
        g = Gossip(self.home, config, self.mesh, "me-1", lambda: NOW)
        g.register()
        return g

    def ask(self, peer: str, since: int = 0) -> list[str]:
        self.mesh.sent.clear()
        self.mesh.deliver(peer, codec.KNOWLEDGE_REQUEST, {"since_epoch": since})
        pages = [p for (to, t, p) in self.mesh.sent if t == codec.KNOWLEDGE_SNAPSHOT]
        self.assertTrue(all(to == peer for (to, _, _) in self.mesh.sent))
        self.assertEqual([p["page"] for p in pages], list(range(1, len(pages) + 1)))
        return [u["id"] for p in pages for u in p["units"]]

    def test_a_store_change_reaches_the_next_answer(self) -> None:
        put(self.home, "me-1", unit("ku_1", "me-1"))
        self.assertEqual(self.ask("peer-a"), ["ku_1"])
        put(self.home, "me-1", unit("ku_2", "me-1"))
        self.assertEqual(sorted(self.ask("peer-a")), ["ku_1", "ku_2"])
        put(self.home, "me-1", unit("ku_1", "me-1", version=2, confidence=0.95))
        self.mesh.sent.clear()
        self.mesh.deliver("peer-a", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
        [page] = [p for (_, t, p) in self.mesh.sent if t == codec.KNOWLEDGE_SNAPSHOT]
        self.assertEqual({u["id"]: u["version"] for u in page["units"]}, {"ku_1": 2, "ku_2": 1})

    def test_trust_changes_reach_the_next_answer(self) -> None:
        put(
            self.home,
            "me-1",
            unit("ku_x", "peer-x"),
            consented(unit("ku_trusted", "me-1"), min_trust_tier="confirmed"),
        )
        self.assertEqual(self.ask("peer-a"), ["ku_x"])
        with trust_transaction(self.home) as book:
            book.ensure("peer-a", NOW).trust_level = 0.95
        self.assertEqual(sorted(self.ask("peer-a")), ["ku_trusted", "ku_x"])
        # peer-b's tier did not change: not for it.
        self.assertEqual(self.ask("peer-b"), ["ku_x"])
        # The source floods: frozen by the rate cap, its units stop spreading.
        with trust_transaction(self.home) as book:
            book.ensure("peer-x", NOW).freeze("rate cap: too many units", NOW)
        self.assertEqual(self.ask("peer-a"), ["ku_trusted"])
        self.assertEqual(self.ask("peer-b"), [])

    def test_exposure_changes_reach_the_next_answer(self) -> None:
        put(self.home, "me-1", unit("ku_1", "me-1"), unit("ku_2", "me-1"))
        self.assertEqual(self.ask("peer-a"), ["ku_1", "ku_2"])
        set_exposure(self.home, "ku_2", HIDE)
        self.assertEqual(self.ask("peer-a"), ["ku_1"])

    def test_config_changes_reach_the_next_answer(self) -> None:
        put(
            self.home,
            "me-1",
            unit("ku_1", "me-1", cmd="rm -rf build"),
            unit("ku_2", "me-1"),
        )
        self.assertEqual(self.ask("peer-a"), ["ku_1", "ku_2"])
        self.gossip.config = dataclasses.replace(
            self.gossip.config, hive=dataclasses.replace(HiveConfig(), exclude_commands=["rm -rf"])
        )
        self.assertEqual(self.ask("peer-a"), ["ku_2"])

    def test_a_peer_never_gets_what_only_another_may_have(self) -> None:
        put(
            self.home,
            "me-1",
            unit("ku_all", "me-1"),
            consented(unit("ku_a", "me-1"), allow_peers=["peer-a"]),
            unit("ku_from_b", "peer-b"),
        )
        for _ in range(2):
            self.assertEqual(self.ask("peer-a"), ["ku_all", "ku_a", "ku_from_b"])
            self.assertEqual(self.ask("peer-b"), ["ku_all"])
            self.assertEqual(self.ask("peer-b", since=1), ["ku_all"])

    def test_answers_mark_units_in_flight_and_count_them(self) -> None:
        records = [unit(f"ku_{i}", "me-1") for i in range(3)]
        put(self.home, "me-1", *records)
        ps = self.gossip.state.peer("peer-a")
        before = (ps.units_up, ps.bytes_up)
        self.ask("peer-a")
        sizes = sum(KnowledgeUnit.from_json(r).wire_size for r in records)
        self.assertEqual((ps.units_up - before[0], ps.bytes_up - before[1]), (3, sizes))
        self.assertEqual(
            self.gossip._inflight["peer-a"],
            {"ku_0": 1, "ku_1": 1, "ku_2": 1},
        )
        # A since_epoch 0 answer leaves nothing for a push round.
        self.assertEqual([t for (_, t, _) in self.mesh.sent], [codec.KNOWLEDGE_SNAPSHOT])

    def test_since_epoch_leaves_out_what_the_peer_acknowledged(self) -> None:
        put(self.home, "me-1", unit("ku_1", "me-1"), unit("ku_2", "me-1"))
        self.ask("peer-a")
        self.mesh.deliver("peer-a", "ack", {"ack_id": "x", "knowledge": [["ku_1", 1], ["ku_2", 1]]})
        self.assertEqual(self.ask("peer-a", since=1), [])
        self.assertEqual(self.ask("peer-a"), ["ku_1", "ku_2"])  # "I have nothing"
        put(self.home, "me-1", unit("ku_2", "me-1", version=2, confidence=0.95))
        self.assertEqual(self.ask("peer-a", since=1), ["ku_2"])
        # Units validated before since_epoch go in a sync instead.
        self.mesh.deliver("peer-a", "ack", {"ack_id": "x", "knowledge": [["ku_2", 2]]})
        put(self.home, "me-1", unit("ku_3", "me-1", validated=NOW - 5000))
        self.assertEqual(self.ask("peer-a", since=NOW - 200), [])
        [sync] = [p for (_, t, p) in self.mesh.sent if t == codec.KNOWLEDGE_SYNC]
        self.assertEqual([u["id"] for u in sync["units"]], ["ku_3"])

    def test_change_notices_reload_the_sharing_context(self) -> None:
        seen: dict[str, Any] = {}

        class Changes:
            def on(self, directory: Any, name: str, callback: Any, **_: Any) -> None:
                seen[name] = callback

        self.gossip.watch(Changes())  # type: ignore[arg-type]
        ctx = self.gossip._contexts.get(self.gossip.config.hive)
        seen[EXPOSURE](EXPOSURE)
        self.assertIsNot(self.gossip._contexts.get(self.gossip.config.hive), ctx)


class PacedAnswerTests(SynchronousTestCase):
    """A big answer's pages are encoded as they go out, one per reactor turn (issue 13)."""

    def test_pages_are_encoded_when_sent_and_kept(self) -> None:
        home = temp_home(self)
        roomy = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), max_units=0))
        put(
            home,
            "me-1",
            *(unit(f"ku_p{i:03d}", "peer-b", cmd="x" * 4000 + str(i)) for i in range(300)),
        )
        mesh = FakeMesh("me-1", ["peer-a"])
        clock = Clock()
        g = Gossip(
            home,
            roomy,
            mesh,
            "me-1",
            lambda: NOW,
            call_later=lambda d, f, *a: clock.callLater(d or 0.001, f, *a),
        )
        g.register()

        def ask() -> list[Any]:
            mesh.sent.clear()
            mesh.deliver("peer-a", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
            first = len(mesh.sent)
            for _ in range(20):
                clock.advance(0.001)
            self.assertEqual(first, 1)  # one frame in the request's turn
            return [p for (_, t, p) in mesh.sent if t == codec.KNOWLEDGE_SNAPSHOT]

        mesh.deliver("peer-a", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
        pages = g._answers._by_peer["peer-a"].pages
        self.assertGreaterEqual(len(pages), 3)
        self.assertEqual(
            [p._payload is not None for p in pages], [True] + [False] * (len(pages) - 1)
        )
        for _ in range(20):
            clock.advance(0.001)
        first = ask()
        again = ask()
        self.assertEqual(len(first), len(pages))
        self.assertEqual([id(p) for p in again], [id(p) for p in first])  # kept, not encoded again
        self.assertEqual(sum(len(p["units"]) for p in again), 300)


class EncodedPayloadTests(SynchronousTestCase):
    """codec.encode splices an EncodedPayload's bytes: the same frame as encoding the dict."""

    def test_text_or_bytes_give_the_same_frame(self) -> None:
        value = {"page": 1, "total_pages": 1, "units": [{"a": "caf\u00e9 \U0001f600", "b": 1e-7}]}
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        env = codec.Envelope("msg_1_2", codec.KNOWLEDGE_SNAPSHOT, "me-1", 12, value)
        plain = codec.encode(env)
        for payload in (
            codec.EncodedPayload(value, text),
            codec.EncodedPayload(value, raw=text.encode("utf-8")),
        ):
            self.assertEqual(codec.encode(dataclasses.replace(env, payload=payload)), plain)
            self.assertEqual(payload.json, text)
            self.assertEqual(payload.raw, text.encode("utf-8"))
            self.assertEqual(dict(payload), value)
        with self.assertRaises(TypeError):
            codec.EncodedPayload(value)
        with self.assertRaises(ValueError):
            codec.encode(dataclasses.replace(env, msg_type="nope", payload=payload))


def _rewrite_in_place_keeping_mtime(path: Any, old: bytes, new: bytes) -> None:
    """What claudectl 0.64 does to trust.json (truncate and write the same
    inode), within one tick of a coarse file clock: the stat() signature stays."""
    import os

    st = os.stat(path)
    data = path.read_bytes()
    fresh = data.replace(old, new)
    assert old in data and len(fresh) == len(data)
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(fresh)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class InPlaceRewriteTests(SynchronousTestCase):
    """A same-size, same-inode rewrite inside one file-clock tick still changes
    the answer at the next request (review of the answer cache: the stat()
    signature alone missed it; the bytes are compared while a file is young)."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.mesh = FakeMesh("me-1", ["peer-a"])
        self.gossip = Gossip(self.home, Config(), self.mesh, "me-1", lambda: NOW)
        self.gossip.register()
        put(
            self.home,
            "me-1",
            dict(unit("ku_secret", "me-1"), sharing_consent={"min_trust_tier": "confirmed"}),
            unit("ku_public", "me-1"),
        )
        with trust_transaction(self.home) as book:
            book.set_level("peer-a", 0.9, NOW)

    def ask(self) -> list[str]:
        self.mesh.sent.clear()
        self.mesh.deliver("peer-a", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
        return sorted(
            u["id"]
            for (_, t, p) in self.mesh.sent
            if t == codec.KNOWLEDGE_SNAPSHOT
            for u in p["units"]
        )

    def test_a_demoted_peer_loses_confirmed_only_units_at_once(self) -> None:
        from claudectl.filesig import signature
        from claudectl.hive.trust import trust_path

        self.assertEqual(self.ask(), ["ku_public", "ku_secret"])
        path = trust_path(self.home)
        before = signature(path)
        _rewrite_in_place_keeping_mtime(path, b'"trust_level": 0.9', b'"trust_level": 0.1')
        self.assertEqual(signature(path), before)  # what the cache cannot see by stat()
        self.assertEqual(self.ask(), ["ku_public"])

    def test_a_unit_hidden_in_place_is_not_answered(self) -> None:
        path = self.home.hive / EXPOSURE
        path.write_text('{\n  "ku_public": "expose",\n  "ku_zzzzzz": "hide"\n}')
        self.assertIn("ku_public", self.ask())
        _rewrite_in_place_keeping_mtime(
            path,
            b'"ku_public": "expose",\n  "ku_zzzzzz": "hide"',
            b'"ku_public": "hide",\n  "ku_zzzzzz": "expose"',
        )
        self.assertNotIn("ku_public", self.ask())
