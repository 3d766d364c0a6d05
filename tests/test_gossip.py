"""Hive gossip: the engine against a FakeMesh, then three real services in a line."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.config import Config, HiveConfig
from claudectl.control import commands as C
from claudectl.control.client import call_control
from claudectl.hive import gossip as gossip_mod
from claudectl.hive.gossip import Gossip
from claudectl.hive.prompt import build_prompt
from claudectl.hive.sharing import ShareContext
from claudectl.hive.store import hive_file, read_units_file, store_transaction
from claudectl.hive.trust import trust_transaction
from claudectl.hive.units import KnowledgeUnit, paginate
from claudectl.relay import codec
from claudectl.relay.keystore import KeyStore
from tests.common import FakeMesh, temp_home, vector
from tests.test_services import RunningService, wait_for

NOW = 1_800_000_000


def unit_json(
    uid: str,
    source: str,
    cmd: str = "cargo test",
    confidence: float = 0.9,
    evidence: int = 10,
    category: str = "best_practice",
    version: int = 1,
    hops: int = 0,
    validated: int = NOW - 100,
) -> dict[str, Any]:
    return {
        "id": uid,
        "scope": {"type": "universal"},
        "category": category,
        "content": {
            "type": "pattern",
            "tool": "Bash",
            "command_pattern": cmd,
            "preferred_action": "approve",
            "accept_rate": confidence,
            "sample_count": evidence,
            "conditions": [],
        },
        "evidence_count": evidence,
        "confidence": confidence,
        "source_peer": source,
        "originated_at": validated,
        "last_validated_at": validated,
        "propagation_count": hops,
        "version": version,
    }


def put(home: Any, local_id: str, *units: dict[str, Any]) -> None:
    with store_transaction(home, local_id=local_id, now=NOW) as store:
        for u in units:
            store.insert(KnowledgeUnit.from_json(u))


def ack_all(mesh: FakeMesh, peer: str) -> None:
    """``peer`` (of this project) acknowledges every unit sent to it so far."""
    pairs = [
        [u["id"], u["version"]]
        for (to, t, p) in mesh.sent
        if to == peer and t in ("knowledge_sync", "knowledge_snapshot")
        for u in p["units"]
    ]
    mesh.deliver(peer, "ack", {"ack_id": "msg_x", "knowledge": pairs})


def stored_all(home: Any) -> list[KnowledgeUnit]:
    return read_units_file(hive_file(home, "knowledge.jsonl")).store.units()


def stored(home: Any) -> dict[str, KnowledgeUnit]:
    return {u.id: u for u in read_units_file(hive_file(home, "knowledge.jsonl")).store.units()}


class EngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.mesh = FakeMesh("me-1")
        self.gossip = self.make()

    def make(self, **hive: Any) -> Gossip:
        config = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), **hive))
        self.mesh = FakeMesh("me-1")
        g = Gossip(self.home, config, self.mesh, "me-1", lambda: NOW)
        g.register()
        return g

    def sent(self, msg_type: str, peer: str | None = None) -> list[Any]:
        return [p for (to, t, p) in self.mesh.sent if t == msg_type and peer in (None, to)]

    def test_link_up_requests_and_pushes(self) -> None:
        put(self.home, "me-1", unit_json("ku_1", "me-1"))
        self.mesh.connect("peer-a")
        [req] = self.sent("knowledge_request", "peer-a")
        self.assertEqual(req, {"since_epoch": 0})
        [sync] = self.sent("knowledge_sync", "peer-a")
        self.assertEqual([u["id"] for u in sync["units"]], ["ku_1"])
        self.assertEqual(sync["sync_epoch"], NOW)
        # Nothing new: nothing sent again.
        self.assertEqual(self.gossip.push_all(), 0)
        # A new version goes out.
        put(self.home, "me-1", unit_json("ku_1", "me-1", version=2, confidence=0.95))
        self.assertEqual(self.gossip.push_all(), 1)

    def test_push_rounds_reuse_the_share_context(self) -> None:
        # push/push_all read trust.json and exposure.json again only when
        # they changed (ShareContexts), not on every round.
        put(self.home, "me-1", unit_json("ku_1", "me-1"))
        self.mesh.connect("peer-a")
        loads = self.gossip._contexts.loads
        for v in (2, 3, 4):
            put(self.home, "me-1", unit_json("ku_1", "me-1", version=v, confidence=0.95))
            self.assertEqual(self.gossip.push_all(), 1)
            self.assertEqual(self.gossip.push("peer-a"), 0)
        self.assertEqual(self.gossip._contexts.loads, loads)
        # A changed file is read again by the next round.
        with trust_transaction(self.home, HiveConfig().default_trust) as book:
            book.ensure("peer-z", NOW)
        self.gossip.push_all()
        self.assertEqual(self.gossip._contexts.loads, loads + 1)

    def test_private_units_never_leave(self) -> None:
        put(
            self.home,
            "me-1",
            unit_json("ku_p", "me-1", category="personal"),
            unit_json("ku_s", "me-1", cmd="ls"),
        )
        self.mesh.connect("peer-a")
        ids = [u["id"] for s in self.sent("knowledge_sync") for u in s["units"]]
        self.assertEqual(ids, ["ku_s"])
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        [snap] = self.sent("knowledge_snapshot")
        self.assertEqual([u["id"] for u in snap["units"]], ["ku_s"])
        self.assertEqual((snap["page"], snap["total_pages"]), (1, 1))

    def test_bad_unit_does_not_block_the_batch(self) -> None:
        self.mesh.connect("peer-a")
        self.mesh.connect("peer-b")
        self.mesh.sent.clear()
        good = unit_json("ku_g", "peer-a")
        bad = dict(unit_json("ku_b", "peer-a", cmd="x"), evidence_count="many")
        self.mesh.deliver("peer-a", "knowledge_sync", {"sync_epoch": NOW, "units": [bad, good]})
        units = stored(self.home)
        self.assertEqual(sorted(units), ["ku_g"])
        self.assertEqual(units["ku_g"].propagation_count, 1)
        self.assertEqual(self.gossip.counters["bad_units"], 1)
        # Passed on to peer-b, not echoed to peer-a.
        self.assertEqual(self.sent("knowledge_sync", "peer-a"), [])
        [fwd] = self.sent("knowledge_sync", "peer-b")
        self.assertEqual([(u["id"], u["propagation_count"]) for u in fwd["units"]], [("ku_g", 1)])

    def test_local_always_wins(self) -> None:
        put(self.home, "me-1", unit_json("ku_local", "me-1", confidence=0.6, evidence=5))
        self.mesh.connect("peer-a")
        self.mesh.deliver(
            "peer-a",
            "knowledge_sync",
            {
                "sync_epoch": NOW,
                "units": [unit_json("ku_r1", "peer-a", confidence=0.99, evidence=100)],
            },
        )
        units = stored(self.home)
        self.assertEqual(sorted(units), ["ku_local"])
        conflicts = (self.home.hive / "conflicts.jsonl").read_text().splitlines()
        self.assertEqual(json.loads(conflicts[0])["incoming_id"], "ku_r1")
        resolution = json.loads((self.home.hive / "resolutions.jsonl").read_text())
        self.assertEqual(resolution["result"], "rejected_local")

    def test_hop_limit(self) -> None:
        self.gossip = self.make(max_propagation=3)
        self.mesh.connect("peer-a")
        self.mesh.connect("peer-b")
        self.mesh.sent.clear()
        self.mesh.deliver(
            "peer-a",
            "knowledge_sync",
            {"sync_epoch": NOW, "units": [unit_json("ku_far", "peer-z", hops=2)]},
        )
        self.assertEqual(stored(self.home)["ku_far"].propagation_count, 3)
        self.assertEqual(self.sent("knowledge_sync", "peer-b"), [])

    def test_rate_cap_drops_excess(self) -> None:
        self.gossip = self.make(max_units_per_peer_per_day=10)
        self.mesh.connect("peer-a")
        batch = [unit_json(f"ku_{i}", "peer-a", cmd=f"cmd {i}") for i in range(15)]
        self.mesh.deliver("peer-a", "knowledge_sync", {"sync_epoch": NOW, "units": batch})
        self.assertEqual(len(stored(self.home)), 10)
        self.assertEqual(self.gossip.counters["dropped_rate_cap"], 5)

    def test_snapshot_pages(self) -> None:
        put(
            self.home,
            "me-1",
            *[unit_json(f"ku_{i}", "me-1", cmd=f"command number {i}") for i in range(5000)],
        )
        self.mesh.connect("peer-a")
        self.mesh.sent.clear()
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        pages = self.sent("knowledge_snapshot")
        self.assertGreater(len(pages), 1)
        self.assertEqual([p["page"] for p in pages], list(range(1, len(pages) + 1)))
        self.assertTrue(all(p["total_pages"] == len(pages) for p in pages))
        self.assertEqual(sum(len(p["units"]) for p in pages), 5000)
        for p in pages:
            size = sum(len(json.dumps(u, separators=(",", ":"))) for u in p["units"])
            self.assertLessEqual(size, 512_000)

    def test_snapshot_pages_merge_together(self) -> None:
        self.mesh.connect("peer-a")
        pages = [
            [unit_json(f"ku_{p}_{i}", "peer-a", cmd=f"c{p} {i}") for i in range(3)]
            for p in range(3)
        ]
        for n, units in enumerate(pages, 1):
            self.mesh.deliver(
                "peer-a", "knowledge_snapshot", {"page": n, "total_pages": 3, "units": units}
            )
            # Nothing is merged before the last page.
            self.assertEqual(len(stored(self.home)), 9 if n == 3 else 0)
        self.assertEqual(self.gossip.counters["merged_batches"], 1)

    def test_same_unit_by_a_longer_path_is_a_duplicate(self) -> None:
        self.mesh.connect("peer-a")
        self.mesh.connect("peer-b")
        self.mesh.deliver(
            "peer-a",
            "knowledge_sync",
            {"sync_epoch": NOW, "units": [unit_json("ku_x", "peer-z", hops=2)]},
        )
        self.mesh.sent.clear()
        self.mesh.deliver(
            "peer-b",
            "knowledge_sync",
            {"sync_epoch": NOW, "units": [unit_json("ku_x", "peer-z", hops=0)]},
        )
        self.assertEqual(stored(self.home)["ku_x"].propagation_count, 1)  # the shorter path
        self.mesh.deliver(
            "peer-b",
            "knowledge_sync",
            {"sync_epoch": NOW, "units": [unit_json("ku_x", "peer-z", hops=4)]},
        )
        self.assertEqual(stored(self.home)["ku_x"].propagation_count, 1)
        self.assertFalse((self.home.hive / "resolutions.jsonl").exists())

    def test_request_since_epoch(self) -> None:
        put(
            self.home,
            "me-1",
            unit_json("old", "me-1", cmd="a", validated=NOW - 5000),
            unit_json("new", "me-1", cmd="b", validated=NOW - 10),
        )
        self.mesh.peers["peer-a"] = "mutual"  # connected, no link-up push yet
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": NOW - 100})
        [snap] = self.sent("knowledge_snapshot")
        self.assertEqual([u["id"] for u in snap["units"]], ["new"])
        # The older unit it has not had follows in a sync; nothing is sent twice.
        [sync] = self.sent("knowledge_sync")
        self.assertEqual([u["id"] for u in sync["units"]], ["old"])
        # Asked again before acknowledging: what was only queued is offered again.
        self.mesh.sent.clear()
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": NOW - 100})
        [snap] = self.sent("knowledge_snapshot")
        self.assertEqual([u["id"] for u in snap["units"]], ["new"])
        # Once it acknowledged them, nothing is sent twice.
        ack_all(self.mesh, "peer-a")
        self.mesh.sent.clear()
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": NOW - 100})
        [snap] = self.sent("knowledge_snapshot")
        self.assertEqual(snap["units"], [])

    def test_restart_resumes_from_cursors(self) -> None:
        put(self.home, "me-1", unit_json("ku_1", "me-1"))
        self.mesh.connect("peer-a")
        self.mesh.deliver(
            "peer-a",
            "knowledge_sync",
            {
                "sync_epoch": NOW,
                "units": [unit_json("ku_r", "peer-a", cmd="make", validated=NOW - 7)],
            },
        )
        ack_all(self.mesh, "peer-a")
        self.gossip.stop()
        # A new process on the same home.
        mesh2 = FakeMesh("me-1")
        g2 = Gossip(self.home, Config(), mesh2, "me-1", lambda: NOW)
        g2.register()
        mesh2.connect("peer-a")
        [req] = [p for (_, t, p) in mesh2.sent if t == "knowledge_request"]
        self.assertEqual(req, {"since_epoch": NOW - 7})
        self.assertEqual([t for (_, t, _) in mesh2.sent if t == "knowledge_sync"], [])

    def test_claudectl_sync_state_file_is_readable(self) -> None:
        (self.home.hive).mkdir(parents=True, exist_ok=True)
        (self.home.hive / "sync_state.json").write_text(
            json.dumps(
                {"peer-a": {"peer_id": "peer-a", "last_sync_epoch": 5, "units_sent": ["ku_1"]}}
            )
        )
        g = Gossip(self.home, Config(), FakeMesh("me-1"), "me-1", lambda: NOW)
        self.assertEqual(g.state.peer("peer-a").sent, {"ku_1": 0})
        g.state.save()
        data = json.loads((self.home.hive / "sync_state.json").read_text())
        self.assertEqual(data["peer-a"]["units_sent"], ["ku_1"])
        self.assertEqual(data["peer-a"]["last_sync_epoch"], 5)

    def test_vector_sync_frame_merges(self) -> None:
        line = vector("hive.frame.knowledge_sync")["expected"]["line"]
        env = json.loads(line)
        g = Gossip(self.home, Config(), self.mesh, "me-1", lambda: env["payload"]["sync_epoch"])
        self.mesh.handlers.clear()
        g.register()
        self.mesh.connect(env["from_peer"])
        self.mesh.deliver(env["from_peer"], "knowledge_sync", env["payload"])
        self.assertEqual(len(stored(self.home)), len(env["payload"]["units"]))


class ActiveTests(SynchronousTestCase):
    def test_follows_the_mode_file(self) -> None:
        """`hive on` / `hive off` (the CLI writing $HIVE/mode) apply at the next link."""
        from claudectl.atomic import atomic_write

        home = temp_home(self)
        g = Gossip(home, Config(), FakeMesh("me-1"), "me-1", lambda: NOW)
        default = Config().hive.enabled
        self.assertEqual(g.active(), default)
        mode = home.hive / "mode"
        mode.parent.mkdir(parents=True, exist_ok=True)
        for text, want in (("off", False), ("on", True), ("off", False), ("on\n", True)):
            atomic_write(mode, text)
            self.assertEqual(g.active(), want, text)
            self.assertEqual(g.active(), want, text)
        mode.write_text("off\n")  # rewritten in place (another size), not replaced
        self.assertFalse(g.active())
        mode.unlink()
        self.assertEqual(g.active(), default)


class LinkUpPushTests(SynchronousTestCase):
    """The push round after a link comes up, and short links (a storm of them)."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        put(self.home, "me-1", unit_json("ku_lu1", "me-1"))
        self.mesh = FakeMesh("me-1", ["peer-a"])
        self.clock = Clock()
        self.gossip = Gossip(
            self.home, Config(), self.mesh, "me-1", lambda: NOW, call_later=self.clock.callLater
        )

    def pushed(self) -> list[str]:
        return [t for _, t, _ in self.mesh.sent if t == codec.KNOWLEDGE_SYNC]

    def test_push_round_after_the_delay(self) -> None:
        self.gossip.on_link_up("peer-a")
        self.clock.advance(0)
        self.assertEqual([t for _, t, _ in self.mesh.sent], [codec.KNOWLEDGE_REQUEST])
        self.clock.advance(gossip_mod.LINKUP_PUSH_DELAY_SECS)
        self.assertEqual(self.pushed(), [codec.KNOWLEDGE_SYNC])

    def test_short_links_leave_no_timer(self) -> None:
        for _ in range(50):
            self.gossip.on_link_up("peer-a")
            self.clock.advance(0)
            self.gossip.on_link_down("peer-a")
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.clock.advance(gossip_mod.LINKUP_PUSH_DELAY_SECS)
        self.assertEqual(self.pushed(), [])

    def test_a_new_link_replaces_the_pending_round(self) -> None:
        self.gossip.on_link_up("peer-a")
        self.clock.advance(1)
        self.gossip.on_link_up("peer-a")  # a newer link, the old one not reported down
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(gossip_mod.LINKUP_PUSH_DELAY_SECS)
        self.assertEqual(self.pushed(), [codec.KNOWLEDGE_SYNC])


class LineOfThreeTests(TestCase):
    """A–B–C on loopback: knowledge distilled on A reaches C with two hops."""

    timeout = 60

    async def test_unit_travels_two_hops_and_never_overrides_local(self) -> None:
        a, b, c = (RunningService(temp_home(self)) for _ in range(3))
        ids = {}
        for name, s in (("a", a), ("b", b), ("c", c)):
            ids[name] = KeyStore(s.home).ensure_identity()
        for x, y in (("a", "b"), ("b", "c")):
            sx, sy = {"a": a, "b": b, "c": c}[x], {"a": a, "b": b, "c": c}[y]
            key = bytes([len(x + y)]) * 32
            KeyStore(sx.home).save_key(ids[y], key)
            KeyStore(sy.home).save_key(ids[x], key)
        # C already has its own opinion about "git push".
        put(
            c.home,
            ids["c"],
            unit_json(
                "ku_c_local", ids["c"], cmd="git push", confidence=0.6, validated=int(time.time())
            ),
        )
        for s in (a, b, c):
            s.start()
            self.addCleanup(s.stop)
        await wait_for(lambda: all(s.node.listening_ports for s in (a, b, c)))
        await call_control(reactor, a.home, C.Connect, address=f"127.0.0.1:{b.port}")
        await call_control(reactor, c.home, C.Connect, address=f"127.0.0.1:{b.port}")
        await wait_for(lambda: len(b.node.mesh.connected_peers()) == 2)
        now = int(time.time())
        put(
            a.home,
            ids["a"],
            unit_json("ku_a1", ids["a"], validated=now),
            unit_json(
                "ku_a2", ids["a"], cmd="git push", confidence=0.99, evidence=50, validated=now
            ),
        )
        await wait_for(lambda: "ku_a1" in stored(c.home), timeout=30)
        on_c = stored(c.home)
        self.assertEqual(on_c["ku_a1"].propagation_count, 2)
        self.assertEqual(stored(b.home)["ku_a1"].propagation_count, 1)
        # C's local unit for the same key was not overridden.
        self.assertIn("ku_c_local", on_c)
        self.assertNotIn("ku_a2", on_c)
        # It shows in C's brain prompt with A's trust tier (no record: Suggested).
        prompt = build_prompt(c.home, HiveConfig(), ids["c"], int(time.time()))
        self.assertIn(
            f"- [hive, suggested] [Bash, cargo test] approve (90%) — 10 decisions from {ids['a']}",
            prompt,
        )


class DoneWhenStoryTests(SynchronousTestCase):
    """
    The issue's story with real processes: three instances (three homes) in a
    line; knowledge distilled on the first shows, with its trust tier, in
    `hive prompt` on the third.
    """

    def test_distill_on_a_prompt_on_c(self) -> None:
        from tests.common import ServeProcess, run_cli
        from tests.test_hive_distill import decision, write_log

        homes = [temp_home(self) for _ in range(3)]
        ids = [run_cli(h, "relay", "identity").stdout.strip() for h in homes]
        for x, y in ((0, 1), (1, 2)):
            key = bytes([x + y + 1]) * 32
            KeyStore(homes[x]).save_key(ids[y], key)
            KeyStore(homes[y]).save_key(ids[x], key)
        procs = []
        for h in homes:
            p = ServeProcess.serve(h, "--listen", "tcp:0:interface=127.0.0.1")
            self.addCleanup(p.stop)
            procs.append(p)
        ports = [p.port() for p in procs]
        for x in (0, 2):
            r = run_cli(homes[x], "relay", "connect", f"127.0.0.1:{ports[1]}")
            self.assertEqual(r.returncode, 0, r.stderr)
        write_log(homes[0], [decision(i) for i in range(12)])
        r = run_cli(homes[0], "hive", "distill")
        self.assertEqual(r.returncode, 0, r.stderr)
        started = time.monotonic()
        expected = (
            f"[hive, suggested] [Bash, cargo test] approve (100%) — 12 decisions from {ids[0]}"
        )
        while True:
            out = run_cli(homes[2], "hive", "prompt").stdout
            if expected in out:
                break
            self.assertLess(time.monotonic() - started, 20, out)
            time.sleep(0.1)
        # Raising A's trust on C alone does not change the label: B delivered
        # the unit, and a unit is trusted no more than its deliverer (trust
        # by path).  Raising B's too does.
        run_cli(homes[2], "hive", "trust", ids[0], "0.9")
        self.assertIn(expected, run_cli(homes[2], "hive", "prompt").stdout)
        run_cli(homes[2], "hive", "trust", ids[1], "0.9")
        self.assertIn("- [hive] [Bash, cargo test]", run_cli(homes[2], "hive", "prompt").stdout)


class FrameSpliceTests(SynchronousTestCase):
    """
    Sync and snapshot payloads carry their frame text, spliced from each
    unit's cached JSON: the frame must be byte for byte what encoding the
    same payload as a plain dict gives (what claudectl 0.64 reads).
    """

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.mesh = FakeMesh("me-1")
        self.gossip = Gossip(self.home, Config(), self.mesh, "me-1", lambda: NOW)
        self.gossip.register()

    def frames(self, msg_type: str) -> list[Any]:
        return [p for (_, t, p) in self.mesh.sent if t == msg_type]

    def assert_spliced(self, payload: Any) -> None:
        self.assertIsInstance(payload, codec.EncodedPayload)
        env = codec.Envelope("msg_1_2", "knowledge_sync", "me-1", 12, payload)
        plain = codec.Envelope("msg_1_2", "knowledge_sync", "me-1", 12, json.loads(payload.json))
        self.assertEqual(codec.encode(env), codec.encode(plain))
        self.assertEqual(json.loads(payload.json), dict(payload))
        self.assertEqual(codec.decode(codec.encode(env)).payload, dict(payload))

    def test_sync_and_snapshot_frames_are_exact(self) -> None:
        units = [
            unit_json("ku_1", "me-1", cmd='grep -r "caf\u00e9" \u2014 \U0001f600'),
            dict(unit_json("ku_2", "me-1", cmd="make \\ x"), sharing_consent={"expires_at": NOW}),
            unit_json("ku_3", "me-1", cmd="ls\t-la", confidence=1e-7),
        ]
        put(self.home, "me-1", *units)
        self.mesh.connect("peer-a")
        [sync] = self.frames("knowledge_sync")
        self.assert_spliced(sync)
        self.assertEqual(sorted(u["id"] for u in sync["units"]), ["ku_1", "ku_2", "ku_3"])
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        [snap] = self.frames("knowledge_snapshot")
        self.assert_spliced(snap)
        self.assertEqual((snap["page"], snap["total_pages"]), (1, 1))

    def test_pages_split_as_before(self) -> None:
        # Units of ~40 KB: 13 fit a 512,000-byte page.
        big = [unit_json(f"ku_{i}", "me-1", cmd=f"{i} " + "x" * 40_000) for i in range(30)]
        put(self.home, "me-1", *big)
        self.mesh.connect("peer-a")
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        snaps = self.frames("knowledge_snapshot")
        sizes = [len(u) for u in paginate(read_units(self.home))]
        self.assertEqual([len(s["units"]) for s in snaps], sizes)
        self.assertEqual([s["page"] for s in snaps], list(range(1, len(snaps) + 1)))
        for s in snaps:
            self.assert_spliced(s)
            self.assertEqual(s["total_pages"], len(snaps))

    def test_empty_snapshot_is_one_empty_page(self) -> None:
        self.mesh.connect("peer-a")
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        [snap] = self.frames("knowledge_snapshot")
        self.assert_spliced(snap)
        self.assertEqual(snap.json, '{"page":1,"total_pages":1,"units":[]}')

    def test_a_unit_that_cannot_be_encoded_is_left_out(self) -> None:
        put(self.home, "me-1", unit_json("ku_ok", "me-1"))
        nan = dataclasses.replace(
            KnowledgeUnit.from_json(unit_json("ku_nan", "me-1", cmd="nan")),
            confidence=float("nan"),
        )
        self.mesh.connect("peer-a")
        self.mesh.sent.clear()
        self.assertEqual(self.gossip._push("peer-a", [nan], ShareContext("me-1", Config().hive)), 0)
        self.assertEqual(self.frames("knowledge_sync"), [])


def read_units(home: Any) -> list[KnowledgeUnit]:
    return read_units_file(hive_file(home, "knowledge.jsonl")).store.units()


class PacedPushTests(SynchronousTestCase):
    """A push of many frames sends one frame per reactor turn, in order (issue 13)."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        roomy = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), max_units=0))
        # 500 units (the store's default cap), big enough for several 512 kB frames.
        units = [unit_json(f"ku_p{i:04d}", "peer-b", cmd="x" * 4000 + str(i)) for i in range(500)]
        put(self.home, "me-1", *units)
        self.mesh = FakeMesh("me-1", ["peer-a"])
        self.clock = Clock()

        # One reactor turn = 1 ms of this clock (Clock.advance(0) would also
        # run the calls that calls made during it schedule).
        def call_later(delay: float, fn: Any, *args: Any) -> Any:
            return self.clock.callLater(delay or 0.001, fn, *args)

        self.gossip = Gossip(
            self.home, roomy, self.mesh, "me-1", lambda: NOW, call_later=call_later
        )

    def turns(self) -> list[int]:
        """Frames sent per turn until nothing more goes out."""
        counts = []
        while True:
            before = len(self.mesh.sent)
            self.clock.advance(0.001)
            if len(self.mesh.sent) == before:
                return counts
            counts.append(len(self.mesh.sent) - before)

    def test_one_frame_per_turn_in_order(self) -> None:
        self.assertEqual(self.gossip.push("peer-a"), 500)
        self.assertEqual(len(self.mesh.sent), 1)  # the first frame at once
        later = self.turns()
        self.assertGreaterEqual(len(later), 3)
        self.assertEqual(set(later), {1})
        ids = [u["id"] for _, t, p in self.mesh.sent for u in p["units"]]
        self.assertEqual(sorted(ids), sorted(f"ku_p{i:04d}" for i in range(500)))
        self.assertEqual(len(ids), 500)
        # Each frame is exactly what the encoder would make of its payload.
        for _, msg_type, payload in self.mesh.sent:
            self.assertEqual(msg_type, codec.KNOWLEDGE_SYNC)
            self.assertEqual(json.loads(payload.json), json.loads(json.dumps(dict(payload))))

    def test_snapshot_pages_keep_their_order(self) -> None:
        request = codec.Envelope(
            "msg_1_1", codec.KNOWLEDGE_REQUEST, "peer-a", 1, {"since_epoch": 0}
        )
        self.gossip.on_request("peer-a", request)
        self.turns()
        pages = [(p["page"], p["total_pages"]) for _, t, p in self.mesh.sent if "page" in p]
        total = pages[0][1]
        self.assertGreaterEqual(total, 2)
        self.assertEqual(pages, [(n, total) for n in range(1, total + 1)])

    def test_link_down_drops_the_queued_frames(self) -> None:
        self.gossip.push("peer-a")
        self.gossip.on_link_down("peer-a")
        self.assertEqual(self.turns(), [])
        self.assertEqual(len(self.mesh.sent), 1)


class BulkBatchTests(SynchronousTestCase):
    def test_collector_paused_for_big_batches_only(self) -> None:
        seen: list[bool] = []
        home = temp_home(self)
        roomy = dataclasses.replace(
            Config(),
            hive=dataclasses.replace(HiveConfig(), max_units=0, max_units_per_peer_per_day=10_000),
        )
        g = Gossip(home, roomy, FakeMesh("me-1"), "me-1", lambda: NOW)
        # What runs with the collector paused: a batch's work on the writer thread.
        real = g._commit_batches

        def spy(*args: Any) -> Any:
            seen.append(gc.isenabled())
            return real(*args)

        g._commit_batches = spy  # type: ignore[method-assign]
        small = [unit_json(f"ku_s{i}", "peer-a", cmd=f"s{i}") for i in range(3)]
        big = [unit_json(f"ku_b{i}", "peer-a", cmd=f"b{i}") for i in range(gossip_mod.BULK_UNITS)]
        g.receive("peer-a", small)
        g.receive("peer-a", big)
        self.assertEqual(seen, [True, False])
        self.assertTrue(gc.isenabled())
        self.assertEqual(len(stored(home)), 3 + gossip_mod.BULK_UNITS)

    def test_reloaded_units_come_encoded(self) -> None:
        # Their wire JSON is made where the store is read (the writer thread),
        # not by the next push round on the reactor.
        home = temp_home(self)
        put(home, "me-1", *[unit_json(f"ku_w{i}", "peer-a", cmd=f"w{i}") for i in range(5)])
        g = Gossip(home, Config(), FakeMesh("me-1"), "me-1", lambda: NOW)
        g.on_store_changed(first=True)
        assert g._units_cache is not None
        units = g._units_cache[1]
        self.assertEqual(len(units), 5)
        for u in units:
            self.assertIn("wire_json", u.__dict__)
            self.assertEqual(json.loads(u.__dict__["wire_json"]), u.to_json())

    def test_collector_back_on_after_an_error(self) -> None:
        g = Gossip(temp_home(self), Config(), FakeMesh("me-1"), "me-1", lambda: NOW)

        def boom(*args: Any) -> Any:
            raise RuntimeError("boom")

        g._commit_batches = boom  # type: ignore[method-assign]
        g.receive("peer-a", [{}] * gossip_mod.BULK_UNITS)  # the failure is logged
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(gc.isenabled())


class HeldWriter:
    """A StateWriter whose jobs run only when the test says so (one at a time)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], dict[str, Any], defer.Deferred[Any]]] = []
        self.completed = 0

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((fn, args, kwargs, d))
        return d

    def merges(self) -> int:
        """Merge jobs waiting (other jobs -- state saves -- are left to run later)."""
        return sum(1 for job in self.jobs if getattr(job[0], "__name__", "") == "_commit")

    def release(self) -> None:
        """Run the first waiting merge job."""
        [i] = [n for n, job in enumerate(self.jobs) if job[0].__name__ == "_commit"][:1]
        fn, args, kwargs, d = self.jobs.pop(i)
        self.completed += 1
        d.callback(fn(*args, **kwargs))


class CoalescedMergeTests(SynchronousTestCase):
    """Batches that arrive while one is being merged are merged together."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.mesh = FakeMesh("me-1")
        self.writer = HeldWriter()
        self.transactions = 0
        real = gossip_mod.store_transaction

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.transactions += 1
            return real(*args, **kwargs)

        self.patch(gossip_mod, "store_transaction", counting)

    def make(self, **hive: Any) -> Gossip:
        config = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), **hive))
        g = Gossip(self.home, config, self.mesh, "me-1", lambda: NOW, writer=self.writer)  # type: ignore[arg-type]
        g.register()
        return g

    def batch(self, tag: str, source: str, n: int) -> list[dict[str, Any]]:
        return [unit_json(f"ku_{tag}{i}", source, cmd=f"{tag} {i}") for i in range(n)]

    def test_waiting_batches_share_one_transaction(self) -> None:
        g = self.make()
        for p in ("peer-a", "peer-b"):
            self.mesh.connect(p)
        self.writer.jobs.clear()  # link-up bookkeeping
        # Units relayed from their origin peer-x: each gets its deliverer.
        first = g.receive("peer-a", self.batch("a", "peer-x", 3), ack_id="m1")
        second = g.receive("peer-a", self.batch("b", "peer-x", 2), ack_id="m2")
        third = g.receive("peer-b", self.batch("c", "peer-x", 4) + [{"id": 1}], ack_id="m3")
        self.assertEqual(self.writer.merges(), 1)  # the first batch; the others wait
        self.writer.release()
        self.assertEqual(first["accepted"], 3)
        self.assertEqual(self.writer.merges(), 1)  # both waiting batches, one job
        self.writer.release()
        self.assertEqual(self.transactions, 2)
        self.assertEqual((second["accepted"], third["accepted"], third["bad"]), (2, 4, 1))
        self.assertEqual(len(stored(self.home)), 9)
        # Nothing went back to the peer it came from.
        echoed = [
            u["id"]
            for to, t, p in self.mesh.sent
            if t == "knowledge_sync"
            for u in p["units"]
            if (to, u["id"][3]) in (("peer-a", "a"), ("peer-a", "b"), ("peer-b", "c"))
        ]
        self.assertEqual(echoed, [])
        # Each batch is acknowledged to its sender, under its own frame id.
        acks = {(to, p["ack_id"]): len(p["knowledge"]) for to, t, p in self.mesh.sent if t == "ack"}
        self.assertEqual(acks, {("peer-a", "m1"): 3, ("peer-a", "m2"): 2, ("peer-b", "m3"): 4})
        # delivery.json names each batch's own peer.
        book = json.loads((self.home.hive / "delivery.json").read_text())["units"]
        by_id = {e["id"]: e["delivered_by"] for e in book.values()}
        self.assertEqual(by_id["ku_b0"], ["peer-a"])
        self.assertEqual(by_id["ku_c0"], ["peer-b"])

    def test_the_daily_cap_spans_coalesced_batches(self) -> None:
        g = self.make(max_units_per_peer_per_day=5)
        self.mesh.connect("peer-a")
        self.writer.jobs.clear()
        g.receive("peer-a", self.batch("a", "peer-a", 3))
        second = g.receive("peer-a", self.batch("b", "peer-a", 3))
        third = g.receive("peer-a", self.batch("c", "peer-a", 3))
        self.writer.release()
        self.writer.release()
        self.assertEqual((second["accepted"], second["dropped"]), (2, 1))
        self.assertEqual((third["accepted"], third["dropped"]), (0, 3))
        self.assertEqual(len(stored(self.home)), 5)
        self.assertEqual(g.counters["dropped_rate_cap"], 4)

    def test_known_batches_write_nothing_and_keep_their_counts(self) -> None:
        g = self.make()
        self.mesh.connect("peer-a")
        self.writer.jobs.clear()
        units = self.batch("a", "peer-b", 3)  # relayed by peer-a (not its origin)
        g.receive("peer-a", units)
        self.writer.release()
        self.assertEqual(self.transactions, 1)
        again = g.receive("peer-a", units)
        g.receive("peer-a", units)
        while self.writer.merges():
            self.writer.release()
        self.assertEqual(self.transactions, 1)
        self.assertEqual(again["duplicates"], 3)

    def test_a_big_batch_is_encoded_for_sending_once_no_batch_waits(self) -> None:
        g = self.make()
        self.mesh.connect("peer-a")  # the only peer: nothing goes on at once
        self.writer.jobs.clear()
        big = gossip_mod.BULK_UNITS
        g.receive("peer-a", self.batch("a", "peer-a", big))
        g.receive("peer-a", self.batch("b", "peer-a", big))
        self.writer.release()
        names = [job[0].__name__ for job in self.writer.jobs]
        self.assertNotIn("_in_bulk", names)  # a batch waits: it goes first
        self.writer.release()
        [warm] = [job for job in self.writer.jobs if job[0].__name__ == "_in_bulk"]
        self.assertEqual(warm[1][0], g._warm_units)
        units = warm[1][1]
        self.assertEqual(len(units), 2 * big)
        self.assertFalse(any("wire_json" in u.__dict__ for u in units))
        fn, args, kwargs, d = warm
        d.callback(fn(*args, **kwargs))
        self.assertTrue(all("wire_json" in u.__dict__ for u in units))

    def test_the_encoding_waits_until_no_batch_came_for_a_while(self) -> None:
        clock = Clock()
        config = dataclasses.replace(Config(), hive=HiveConfig())
        g = Gossip(
            self.home,
            config,
            self.mesh,
            "me-1",
            lambda: NOW,
            call_later=clock.callLater,
            writer=self.writer,  # type: ignore[arg-type]
        )
        g.register()
        self.mesh.connect("peer-a")  # the only peer: nothing goes on at once
        clock.advance(gossip_mod.LINKUP_PUSH_DELAY_SECS)
        self.writer.jobs.clear()
        big = gossip_mod.BULK_UNITS

        def warm_jobs() -> int:
            return sum(1 for job in self.writer.jobs if job[0].__name__ == "_in_bulk")

        g.receive("peer-a", self.batch("a", "peer-a", big))
        self.writer.release()
        clock.advance(gossip_mod.WARM_QUIET_SECS / 2)
        g.receive("peer-a", self.batch("b", "peer-a", big))  # the next page, in the gap
        self.writer.release()
        clock.advance(gossip_mod.WARM_QUIET_SECS * 0.9)
        self.assertEqual(warm_jobs(), 0)  # a quiet gap shorter than the wait
        clock.advance(gossip_mod.WARM_QUIET_SECS * 0.2)
        self.assertEqual(warm_jobs(), 1)  # one job for both pages' units
        [warm] = [job for job in self.writer.jobs if job[0].__name__ == "_in_bulk"]
        self.assertEqual(len(warm[1][1]), 2 * big)

    def test_units_going_on_are_encoded_in_the_merge(self) -> None:
        g = self.make()
        self.mesh.connect("peer-a")
        self.mesh.connect("peer-b")  # they go on to peer-b: encoded at once
        self.writer.jobs.clear()
        g.receive("peer-a", self.batch("a", "peer-a", gossip_mod.BULK_UNITS))
        self.writer.release()
        assert g._units_cache is not None
        self.assertTrue(all("wire_json" in u.__dict__ for u in g._units_cache[1]))

    def test_a_unit_sharing_an_id_with_a_stored_one_is_not_known(self) -> None:
        # Two machines give the same ids (claudectl's counter, H16): "already
        # known" goes by semantic key, so the other unit is still merged.
        g = self.make()
        self.mesh.connect("peer-a")
        self.writer.jobs.clear()
        g.receive("peer-a", [unit_json("ku_1_0", "peer-x", cmd="one")])
        self.writer.release()
        g.receive("peer-a", [unit_json("ku_1_0", "peer-x", cmd="two")])
        self.writer.release()
        self.assertEqual(self.transactions, 2)
        stored_cmds = {u.content.command_pattern for u in stored_all(self.home)}  # type: ignore[attr-defined]
        self.assertEqual(stored_cmds, {"one", "two"})
