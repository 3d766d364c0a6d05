"""
The pure parts of ``scripts/bench_gossip.py``: graphs, the round model of
gossip (checked against the real engine), the engine hop and in-process
snapshot, the log lines the benchmark reads, and the docs section writer.

The process benchmarks themselves are not run here (16 services take too
long for the suite); ``python scripts/bench_gossip.py --quick`` does that.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config
from claudectl.hive.gossip import Gossip
from claudectl.home import Home
from claudectl.relay import codec
from claudectl.relay.keystore import KeyStore

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gossip.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gossip", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gossip", module)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def line(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(n - 1)]


class GraphTests(SynchronousTestCase):
    def test_random_mesh_is_connected_and_bounded(self) -> None:
        rnd = random.Random(3)
        for n, dials in ((16, 3), (100, 3), (300, 2)):
            edges = bench.random_mesh(n, dials, 8, rnd)
            pairs = {frozenset(e) for e in edges}
            self.assertEqual(len(pairs), len(edges), "no link twice")
            self.assertTrue(all(len(p) == 2 for p in pairs), "no self-links")
            degree = [len(a) for a in bench.adjacency(n, edges)]
            self.assertLessEqual(max(degree), 8)
            self.assertNotIn(None, bench.distances(n, edges, 0))

    def test_distances(self) -> None:
        self.assertEqual(bench.distances(4, line(4), 1), [1, 0, 1, 2])
        self.assertEqual(bench.distances(3, [(0, 1)], 0), [0, 1, None])

    def test_percentile_nearest_rank(self) -> None:
        values = [0.1 * i for i in range(1, 11)]
        self.assertAlmostEqual(bench.percentile(values, 50), 0.5)
        self.assertAlmostEqual(bench.percentile(values, 90), 0.9)
        self.assertAlmostEqual(bench.percentile([7.0], 90), 7.0)


class ModelTests(SynchronousTestCase):
    def model(
        self,
        n: int,
        edges: list[tuple[int, int]],
        source: int = 0,
        max_prop: int = 5,
        coalesce: bool = False,
    ) -> Any:
        return bench.simulate_model(
            n, edges, source, max_prop, 100, random.Random(1), coalesce=coalesce
        )

    def test_line_stops_at_max_propagation(self) -> None:
        for coalesce in (False, True):
            r = self.model(9, line(9), coalesce=coalesce)
            self.assertEqual(r.reached, 6)  # the source and 5 hops
            self.assertEqual(r.within_limit, 6)
            self.assertEqual((r.rounds, r.messages, r.bytes), (5, 5, 500))
            self.assertEqual(r.max_hops, 5)
            self.assertEqual(r.duplicates, 0)

    def test_triangle_copies_are_counted_and_the_shorter_path_kept(self) -> None:
        # 0 pushes to 1 and 2; each of them pushes to the other (not to 0,
        # the originator): two copies cross.  Each copy has count 2, the
        # stored count stays 1.
        r = self.model(3, [(0, 1), (1, 2), (0, 2)])
        self.assertEqual((r.reached, r.rounds, r.messages, r.duplicates), (3, 2, 4, 2))
        self.assertEqual(r.max_hops, 1)

    def test_coalescing_saves_the_copy_a_node_got_twice_in_one_round(self) -> None:
        # A diamond: 3 gets the unit from 1 and from 2 in the same round.
        # Pushing at once, 3 sends it on to whichever of them came second;
        # pushing after the round, 3 knows both have it.
        diamond = [(0, 1), (0, 2), (1, 3), (2, 3)]
        at_once = self.model(4, diamond)
        coalesced = self.model(4, diamond, coalesce=True)
        self.assertEqual((at_once.messages, at_once.rounds), (5, 3))
        self.assertEqual((coalesced.messages, coalesced.rounds), (4, 2))
        self.assertEqual((at_once.reached, coalesced.reached), (4, 4))
        self.assertEqual((at_once.max_hops, coalesced.max_hops), (2, 2))

    def test_model_matches_the_engine(self) -> None:
        rnd = random.Random(11)
        edges = bench.random_mesh(12, 3, 8, rnd)
        frame = bench.sync_frame_bytes(
            bench.unit_json("ku_sim_1", "sim0004", "cargo test --sim", bench.NOW), "sim0004"
        )
        for coalesce in (False, True):
            base = Path(self.mktemp())
            base.mkdir()
            engine = bench.simulate_engine(12, edges, 4, base, random.Random(5), coalesce=coalesce)
            model = bench.simulate_model(
                12, edges, 4, 5, frame, random.Random(5), coalesce=coalesce
            )
            self.assertEqual(engine.reached, 12)
            self.assertEqual(
                (engine.rounds, engine.messages, engine.reached, engine.max_hops),
                (model.rounds, model.messages, model.reached, model.max_hops),
                coalesce,
            )
            # Frame ids differ in length by a few bytes; the sizes agree closely.
            self.assertLess(abs(engine.bytes - model.bytes), model.messages * 8)


class EngineTests(SynchronousTestCase):
    def test_hop_forwards_and_counts_file_operations(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        # hop_cost raises unless the new unit went to exactly the 4 other
        # peers each time: with a filled store that also shows the filler
        # units are never sent.
        for store_units in (0, 20):
            cost = bench.hop_cost(base, 1, False, store_units)
            self.assertGreater(cost.ms, 0)
            # A new unit is stored and forwarded; a copy by a longer path
            # leaves the store alone, so it costs fewer writes and fsyncs.
            self.assertGreater(cost.fsyncs, cost.duplicate_fsyncs)
            self.assertGreater(cost.writes, cost.duplicate_writes)
            # A duplicate is not counted against the daily cap: no trust.json
            # write, no fsync at all.
            self.assertEqual(cost.duplicate_fsyncs, 0)

    def test_in_process_snapshot_sends_every_unit_once(self) -> None:
        base = Path(self.mktemp())
        snap = bench.snapshot_in_process(base, False, units=300)
        self.assertEqual(snap.frames.get(codec.KNOWLEDGE_REQUEST), 2)  # each side asks
        self.assertEqual(snap.frames.get(codec.KNOWLEDGE_SNAPSHOT), 2)  # X's page, Y's empty one
        self.assertEqual(snap.frames.get(codec.KNOWLEDGE_SYNC, 0), 0)  # no push after that
        self.assertEqual(snap.units_sent, 300)
        self.assertGreater(snap.seconds, 0)


class LogLineTests(SynchronousTestCase):
    """The benchmark counts what crossed from the services' log lines."""

    def lines(self, fn: Any) -> list[str]:
        with capturedLogs() as events:
            fn()
        return [formatEvent(e) for e in events]

    def test_patterns_match_the_engines_lines(self) -> None:
        bus = bench.Bus(random.Random(1))
        engines = {}
        for ident in ("log-x", "log-y"):
            mesh = bench.BusMesh(bus, ident)
            mesh.peers.append("log-y" if ident == "log-x" else "log-x")
            bus.meshes[ident] = mesh
            engines[ident] = Gossip(
                Home(Path(self.mktemp())), Config(), mesh, ident, lambda: bench.NOW
            )
            engines[ident].register()
        x = engines["log-x"]
        bench.add_units(
            x.home,
            "log-x",
            [bench.unit_json(f"ku_log_{i}", "log-x", f"cmd {i}", bench.NOW) for i in range(3)],
            bench.NOW,
        )
        text = "\n".join(self.lines(lambda: (x.push_all(), bus.run())))
        sent = re.search(bench.sent_rx("log-y"), text)
        batch = re.search(bench.batch_rx("log-x"), text)
        assert sent is not None and batch is not None, text
        self.assertEqual(sent.group(1), "3")
        self.assertEqual(batch.group(1, 4), ("3", "0"))  # 3 new, 0 duplicate
        self.assertIsNotNone(re.search(bench.batch_rx(None), text))
        self.assertIsNotNone(re.search(bench.SENT_RX, text))

        env = codec.EnvelopeFactory("log-y", clock=lambda: bench.NOW).make(
            codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}
        )
        y = engines["log-y"]
        before = y.counters["duplicate_units"]
        text = "\n".join(self.lines(lambda: (x.on_request("log-y", env), bus.run())))
        answer = re.search(bench.answer_rx("log-y"), text)
        assert answer is not None, text
        self.assertEqual(answer.group(1, 2), ("3", "1"))
        # All three again: a batch of duplicates only is counted, not logged.
        self.assertIsNone(re.search(bench.batch_rx("log-x"), text))
        self.assertEqual(y.counters["duplicate_units"] - before, 3)
        self.assertIsNone(re.search(bench.answer_rx("log-z"), text))


class SectionTests(SynchronousTestCase):
    def test_replaces_only_its_own_section(self) -> None:
        path = Path(self.mktemp())
        path.write_text("# Performance\n\n## Gossip\n\nold numbers\n\n## Hive\n\nhive stays\n")
        bench.write_section(["| a |"], ["* note"], "header", path=path)
        text = path.read_text()
        self.assertNotIn("old numbers", text)
        self.assertIn("## Gossip\n\nheader\n\n| a |\n\n* note\n", text)
        self.assertIn("## Hive\n\nhive stays\n", text)
        bench.write_section(["| b |"], [], "again", path=path)
        self.assertEqual(path.read_text().count("## Gossip"), 1)

    def test_keeps_hand_written_subsections(self) -> None:
        path = Path(self.mktemp())
        path.write_text(
            "# Performance\n\n## Gossip\n\nold numbers\n\n"
            "### Where the time goes\n\nanalysis\n\n## Hive\n\nhive stays\n"
        )
        bench.write_section(["| a |"], ["* note"], "header", path=path)
        text = path.read_text()
        self.assertNotIn("old numbers", text)
        self.assertIn(
            "## Gossip\n\nheader\n\n| a |\n\n* note\n\n"
            "### Where the time goes\n\nanalysis\n\n## Hive\n",
            text,
        )

    def test_creates_the_file_with_an_intro(self) -> None:
        path = Path(self.mktemp())
        bench.write_section(["| a |"], [], "header", path=path)
        text = path.read_text()
        self.assertTrue(text.startswith("# Performance\n"))
        self.assertIn("## Gossip\n\nheader\n", text)


class Issue16PartsTests(SynchronousTestCase):
    """The pure parts of issue 16's rows (the services themselves run in the script)."""

    def test_nested_mesh_every_prefix_connected_and_bounded(self) -> None:
        edges = bench.nested_mesh(64, 3, 8, random.Random(4))
        for size in bench.CONV_SIZES:
            sub = [(a, b) for a, b in edges if a < size and b < size]
            self.assertNotIn(None, bench.distances(size, sub, 0), size)
        degree = [len(a) for a in bench.adjacency(64, edges)]
        self.assertLessEqual(max(degree), 8)
        self.assertEqual(len({frozenset(e) for e in edges}), len(edges))
        self.assertTrue(all(a > b for a, b in edges), "a node dials earlier nodes only")

    def test_report_medians_ranges_and_verdicts(self) -> None:
        phase = bench.ConvPhase(
            400,
            [0.05] * 5,
            [0.03, 0.01, 0.02, 0.05, 0.04],
            [0.01] * 5,
            0,
            0,
            0.0,
            0,
            3,
            10.0,
            100.0,
        )
        data = bench.issue16_json(
            bench.Issue16(
                {
                    "ours": [0.0030, 0.0020, 0.0025],
                    "floor": [0.0020] * 3,
                    "cpu_ours": [0.0004, 0.0005, 0.0003],
                    "cpu_floor": [0.0002] * 3,
                    "bytes": [280_000.0],
                },
                {5_000: {"seconds": [0.1, 0.2, 0.12]}, 500: {"seconds": [0.05] * 3}},
                {16: phase, 8: phase},
            )
        )
        req = data["request_snapshot_500"]
        self.assertAlmostEqual(req["ms"]["median"], 2.5)
        self.assertEqual((req["ms"]["min"], req["ms"]["max"]), (2.0, 3.0))
        self.assertAlmostEqual(req["ratio_to_floor"]["median"], 1.25)
        self.assertTrue(req["met"])
        self.assertAlmostEqual(req["times_faster_than_claudectl_064"], 400.0)
        self.assertTrue(data["snapshot"]["5000"]["met"])  # 120 ms <= 150 ms
        self.assertIsNone(data["snapshot"]["500"]["met"])  # no goal at 500
        self.assertTrue(data["convergence"]["16"]["met"])  # 30 ms <= 40 ms
        self.assertIsNone(data["convergence"]["8"]["met"])
        table = "\n".join(bench.issue16_table(data))
        self.assertIn("2.5 ms (2.0\u20133.0)", table)
        self.assertIn("400\u00d7 faster", table)
        self.assertAlmostEqual(req["cpu_us_per_request"]["median"], 400.0)
        self.assertIn("400.0 \u00b5s (300.0\u2013500.0) / 200.0 \u00b5s", table)

    def test_convergence_rows_alone(self) -> None:
        """``--convergence 4,16``: only those rows, with the services' CPU per run."""
        phase = bench.ConvPhase(
            400, [0.05] * 3, [0.03] * 3, [0.01] * 3, 0, 0, 0.0, 0, 3, 10.0, 100.0, [0.2, 0.1, 0.3]
        )
        data = bench.issue16_json(bench.Issue16(None, {}, {4: phase, 16: phase}))
        self.assertNotIn("request_snapshot_500", data)
        self.assertAlmostEqual(data["convergence"]["16"]["service_cpu_ms_per_run"]["median"], 200.0)
        table = "\n".join(bench.issue16_table(data))
        self.assertEqual(table.count("| convergence, "), 2)
        self.assertIn("CPU of all services per run 200.0 ms (100.0\u2013300.0)", table)
        self.assertEqual(bench._sizes("4,8,16"), (4, 8, 16))
        for bad in ("16,8", "1,4", "x", "4,4"):
            with self.assertRaises(bench.argparse.ArgumentTypeError):
                bench._sizes(bad)

    def test_pairing_goes_through_the_cli(self) -> None:
        base = Path(self.mktemp())
        homes = [bench.make_home(base, f"h{i}") for i in range(3)]
        pool = bench.CliPool(2, bench.make_home(base, "runner"))
        bench.CLI_POOL.append(pool)
        try:
            ids = bench.pair_edges(homes, [(1, 0), (2, 0), (2, 1)])
        finally:
            bench.CLI_POOL.remove(pool)
            pool.close()
        self.assertEqual(len(set(ids)), 3)
        # Dialers hold the listeners' keys (what `relay accept` stores) ...
        self.assertIsNotNone(KeyStore(homes[2]).key(ids[0]))
        self.assertIsNotNone(KeyStore(homes[1]).key(ids[0]))
        # ... and listeners an open pair code per dialer until it is claimed.
        self.assertIsNone(KeyStore(homes[0]).key(ids[1]))
        with self.assertRaises(RuntimeError):
            bench.CLI_POOL.append(pool := bench.CliPool(1, homes[0]))
            try:
                bench.cli(homes[0], "relay", "accept", "not-a-code", ids[1])
            finally:
                bench.CLI_POOL.remove(pool)
                pool.close()

    def test_the_relay_benchmark_client_it_borrows_is_there(self) -> None:
        # bench_request measures with scripts/bench_relay.py's client: a rename
        # there must fail here, not in the middle of a benchmark run.
        relay = bench.load_relay_bench()
        for name in ("Client", "SnapshotWaiter", "Service", "PLAINTEXT", "proc_cpu_exact"):
            self.assertTrue(hasattr(relay, name), name)
        self.assertTrue(callable(relay.Client.make))
