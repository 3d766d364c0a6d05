"""
The pure parts of ``scripts/bench_gossip.py``: graphs, the round model of
gossip (checked against the real engine), and the docs section writer.

The process benchmarks themselves are not run here (16 services take too
long for the suite); ``python scripts/bench_gossip.py --quick`` does that.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

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
    def model(self, n: int, edges: list[tuple[int, int]], source: int = 0,
              max_prop: int = 5) -> Any:
        return bench.simulate_model(n, edges, source, max_prop, 100, random.Random(1))

    def test_line_stops_at_max_propagation(self) -> None:
        r = self.model(9, line(9))
        self.assertEqual(r.reached, 6)  # the source and 5 hops
        self.assertEqual(r.within_limit, 6)
        self.assertEqual((r.rounds, r.messages, r.bytes), (5, 5, 500))
        self.assertEqual(r.max_hops, 5)
        self.assertEqual(r.duplicates, 0)

    def test_triangle_copies_are_counted(self) -> None:
        # 0 pushes to 1 and 2; each of them pushes to the other (not to 0,
        # the originator): two copies cross.
        r = self.model(3, [(0, 1), (1, 2), (0, 2)])
        self.assertEqual((r.reached, r.rounds, r.messages, r.duplicates), (3, 2, 4, 2))
        self.assertEqual(r.max_hops, 2)  # a copy with count 2 replaces count 1

    def test_model_matches_the_engine(self) -> None:
        rnd = random.Random(11)
        edges = bench.random_mesh(12, 3, 8, rnd)
        base = Path(self.mktemp())
        base.mkdir()
        engine = bench.simulate_engine(12, edges, 4, base, random.Random(5))
        frame = bench.sync_frame_bytes(
            bench.unit_json("ku_sim_1", "sim0004", "cargo test --sim", bench.NOW), "sim0004")
        model = bench.simulate_model(12, edges, 4, 5, frame, random.Random(5))
        self.assertEqual(engine.reached, 12)
        self.assertEqual((engine.rounds, engine.messages, engine.reached),
                         (model.rounds, model.messages, model.reached))
        # Frame ids differ in length by a few bytes; the sizes agree closely.
        self.assertLess(abs(engine.bytes - model.bytes), model.messages * 8)


class HopCostTests(SynchronousTestCase):
    def test_hop_forwards_and_counts_fsyncs(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        cost = bench.hop_cost(base, 1, False)
        self.assertGreater(cost.ms, 0)
        # A new unit is stored and forwarded (each forward saves sync_state);
        # a copy is stored nowhere new, so it costs fewer fsyncs.
        self.assertGreater(cost.fsyncs, cost.duplicate_fsyncs)
        self.assertGreater(cost.duplicate_fsyncs, 0)


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

    def test_creates_the_file_with_an_intro(self) -> None:
        path = Path(self.mktemp())
        bench.write_section(["| a |"], [], "header", path=path)
        text = path.read_text()
        self.assertTrue(text.startswith("# Performance\n"))
        self.assertIn("## Gossip\n\nheader\n", text)
