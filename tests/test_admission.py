"""Tests for claudectl.relay.admission: in-flight cap, max_peers, per-IP cooldown."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.admission import (
    COOLDOWN_SECS,
    FAILURE_WINDOW_SECS,
    MAX_FAILURES,
    MAX_INFLIGHT_HANDSHAKES,
    STALLED_SECS,
    Admission,
)

IP = "192.0.2.1"
OTHER = "192.0.2.2"


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _Clock()
        self.adm = Admission(self.clock, max_peers=8)

    def fail_n(self, n: int, ip: str = IP, step: float = 0.0) -> list[bool]:
        out = []
        for _ in range(n):
            out.append(self.adm.failure(ip))
            self.clock.t += step
        return out

    def test_constants_match_mission(self) -> None:
        self.assertEqual(
            (MAX_INFLIGHT_HANDSHAKES, MAX_FAILURES, FAILURE_WINDOW_SECS, COOLDOWN_SECS),
            (16, 5, 60.0, 60.0),
        )

    def test_fresh_ip_admitted(self) -> None:
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.assertEqual(self.adm.rejections, {})

    def test_sixteen_in_flight(self) -> None:
        for _ in range(15):
            self.adm.handshake_started()
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.adm.handshake_started()
        self.assertEqual(self.adm.check_accept(IP, 0), "too_many_handshakes")
        self.assertEqual(self.adm.check_accept(OTHER, 0), "too_many_handshakes")
        self.adm.handshake_ended()
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.assertEqual(self.adm.rejections, {"too_many_handshakes": 2})

    def test_inflight_never_negative(self) -> None:
        self.adm.handshake_ended()
        self.assertEqual(self.adm.inflight, 0)

    def test_max_peers(self) -> None:
        self.assertIsNone(self.adm.check_accept(IP, 7))
        # Full: two spare handshakes (a peer replacing its own link), no more.
        self.assertIsNone(self.adm.check_accept(IP, 8))
        self.adm.handshake_started(IP)
        self.assertIsNone(self.adm.check_accept(IP, 8))
        self.adm.handshake_started(IP)
        self.assertEqual(self.adm.check_accept(IP, 8), "max_peers")
        self.assertEqual(self.adm.check_accept(IP, 9), "max_peers")
        zero = Admission(self.clock, max_peers=0)
        self.assertEqual(zero.check_accept(IP, 0), "max_peers")

    def test_five_failures_cool_down_60s(self) -> None:
        self.assertEqual(self.fail_n(4, step=1.0), [False] * 4)
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.assertTrue(self.adm.failure(IP))  # the 5th, at t0+4
        fifth = self.clock.t
        self.assertTrue(self.adm.blocked(IP))
        self.assertEqual(self.adm.check_accept(IP, 0), "rate_limited")
        # Per IP: another address is unaffected.
        self.assertIsNone(self.adm.check_accept(OTHER, 0))
        self.clock.t = fifth + COOLDOWN_SECS - 0.001
        self.assertEqual(self.adm.check_accept(IP, 0), "rate_limited")
        self.clock.t = fifth + COOLDOWN_SECS
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.assertFalse(self.adm.blocked(IP))
        self.assertEqual(self.adm.rejections, {"rate_limited": 2})

    def test_after_cooldown_count_starts_again(self) -> None:
        self.fail_n(5)
        self.clock.t += COOLDOWN_SECS
        self.assertEqual(self.fail_n(4), [False] * 4)
        self.assertIsNone(self.adm.check_accept(IP, 0))
        self.assertTrue(self.adm.failure(IP))

    def test_sliding_window(self) -> None:
        """Failures spread over more than 60 s never block (defect W11 fixed)."""
        # One failure every 16 s: any 60 s window holds at most 4.
        self.assertEqual(self.fail_n(20, step=16.0), [False] * 20)
        self.assertIsNone(self.adm.check_accept(IP, 0))

    def test_window_is_exact(self) -> None:
        # Failures at 0, 15, 30, 45 then 60.0: all five within 60 s -> blocked.
        self.fail_n(4, step=15.0)
        self.assertTrue(self.adm.failure(IP))

    def test_window_just_over(self) -> None:
        # At 0, 15, 30, 45, then 60.5: the first fell out of the window.
        self.fail_n(4, step=15.0)
        self.clock.t += 0.5
        self.assertFalse(self.adm.failure(IP))
        self.assertTrue(self.adm.failure(IP))

    def test_claudectl_anchor_case_blocks_fully(self) -> None:
        """claudectl: 5 failures over 55 s block only ~5 s.  Here: 60 s from the 5th."""
        self.fail_n(4, step=13.75)
        self.assertTrue(self.adm.failure(IP))
        self.clock.t += 30
        self.assertEqual(self.adm.check_accept(IP, 0), "rate_limited")

    def test_success_does_not_clear(self) -> None:
        """Issue 11 item 4: 4 wrong proofs, 1 right one, repeated, still blocks."""
        self.assertEqual(self.fail_n(4), [False] * 4)
        self.adm.success(IP)
        self.assertTrue(self.adm.failure(IP))  # the 5th wrong guess in the window
        self.assertEqual(self.adm.check_accept(IP, 0), "rate_limited")
        # Spread out: successes in between never reset the sliding window.
        self.clock.t += COOLDOWN_SECS
        for _ in range(4):
            self.assertFalse(self.adm.failure(IP))
            self.clock.t += 1
            self.adm.success(IP)
        self.assertTrue(self.adm.failure(IP))

    def test_records_expire(self) -> None:
        self.fail_n(3)
        self.fail_n(5, ip=OTHER)
        self.assertEqual(len(self.adm._ips), 2)
        self.clock.t += COOLDOWN_SECS + FAILURE_WINDOW_SECS + 1
        self.adm.failure("192.0.2.9")
        self.assertEqual(set(self.adm._ips), {"192.0.2.9"})

    def test_blocked_record_not_expired_early(self) -> None:
        self.fail_n(5)
        self.clock.t += 30
        self.adm.failure(OTHER)  # triggers expiry
        self.assertTrue(self.adm.blocked(IP))

    def test_memory_bounded_under_attack(self) -> None:
        """Many source addresses (one failure each) never grow the table past ~1024."""
        biggest = 0
        for i in range(3000):
            self.adm.failure(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
            biggest = max(biggest, len(self.adm._ips))
        self.assertLessEqual(biggest, 1025)
        # Cooling-down IPs survive the purge.
        self.fail_n(5)
        for i in range(1100):
            self.adm.failure(f"10.9.{i // 256}.{i % 256}")
        self.assertTrue(self.adm.blocked(IP))

    def test_rejection_order(self) -> None:
        """A cooling-down IP is reported as rate limited even when also over other limits."""
        self.fail_n(5)
        for _ in range(16):
            self.adm.handshake_started()
        self.assertEqual(self.adm.check_accept(IP, 8), "rate_limited")
        self.assertEqual(self.adm.check_accept(OTHER, 8), "max_peers")
        self.assertEqual(self.adm.check_accept(OTHER, 0), "too_many_handshakes")


class PerAddressInflightTests(SynchronousTestCase):
    """One host cannot take every handshake slot (loopback is exempt)."""

    def test_cap_per_address(self) -> None:
        from claudectl.relay.admission import MAX_INFLIGHT_PER_IP

        adm = Admission(lambda: 0.0, max_peers=8)
        for _ in range(MAX_INFLIGHT_PER_IP):
            self.assertIsNone(adm.check_accept("192.0.2.7", 0))
            adm.handshake_started("192.0.2.7")
        self.assertEqual(adm.check_accept("192.0.2.7", 0), "too_many_handshakes_from_ip")
        self.assertIsNone(adm.check_accept("192.0.2.8", 0))
        adm.handshake_ended("192.0.2.7")
        self.assertIsNone(adm.check_accept("192.0.2.7", 0))

    def test_loopback_exempt(self) -> None:
        adm = Admission(lambda: 0.0, max_peers=8)
        for _ in range(10):
            self.assertIsNone(adm.check_accept("127.0.0.1", 0))
            adm.handshake_started("127.0.0.1")


class SheddingTests(SynchronousTestCase):
    """Issue 11 item 3: idle pre-auth sockets are shed first, by address, oldest first."""

    def setUp(self) -> None:
        self.clock = _Clock()
        self.adm = Admission(self.clock, max_peers=8)
        self.shed: list[str] = []

    def admit(self, name: str, ip: str) -> Any:
        ticket = self.adm.admit(ip, 0, lambda: self.shed.append(name))
        self.assertNotIsInstance(ticket, str)
        self.clock.t += 0.01
        return ticket

    def test_most_represented_address_oldest_idle_first(self) -> None:
        tickets = {}
        for i in range(3):
            tickets[f"a{i}"] = self.admit(f"a{i}", "127.0.0.2")
        for i in range(13):
            tickets[f"b{i}"] = self.admit(f"b{i}", f"10.0.{i}.1")
        # Full: 127.0.0.2 holds the most sockets, and a0 is its oldest idle one.
        self.admit("new1", "10.9.9.9")
        self.assertEqual(self.shed, ["a0"])
        # a1 answered the challenge (progress): a2 goes next, idle before busy.
        self.adm.progress(tickets["a1"])
        self.admit("new2", "10.9.9.8")
        self.assertEqual(self.shed, ["a0", "a2"])
        self.assertEqual(self.adm.inflight, MAX_INFLIGHT_HANDSHAKES)
        self.assertEqual(self.adm.rejections, {"idle_shed": 2})
        # Releasing a shed ticket again changes nothing.
        self.adm.release(tickets["a0"])
        self.assertEqual(self.adm.inflight, MAX_INFLIGHT_HANDSHAKES)

    def test_busy_sockets_are_not_shed_until_stalled(self) -> None:
        tickets = [self.admit(f"t{i}", f"10.0.{i}.1") for i in range(16)]
        for t in tickets:
            self.adm.progress(t)
        self.assertEqual(self.adm.admit("10.9.9.9", 0, lambda: None), "too_many_handshakes")
        self.clock.t += STALLED_SECS
        self.adm.admit("10.9.9.9", 0, lambda: self.shed.append("new"))
        self.assertEqual(self.shed, ["t0"])
        self.assertEqual(self.adm.rejections, {"too_many_handshakes": 1, "stalled_shed": 1})

    def test_a_refused_newcomer_sheds_nobody(self) -> None:
        for i in range(4):
            self.admit(f"t{i}", "192.0.2.1")
        self.adm.failure("192.0.2.9")
        for _ in range(4):
            self.adm.failure("192.0.2.9")
        self.assertEqual(self.adm.admit("192.0.2.9", 0, lambda: None), "rate_limited")
        self.assertEqual(self.adm.admit("192.0.2.9", 8, lambda: None), "rate_limited")
        self.assertEqual(self.shed, [])


class ListenBacklogTests(SynchronousTestCase):
    def test_backlog_added_to_tcp_strings_only(self) -> None:
        from claudectl.relay.admission import LISTEN_BACKLOG, with_listen_backlog

        self.assertEqual(LISTEN_BACKLOG, 1024)
        self.assertEqual(
            with_listen_backlog("tcp:0:interface=127.0.0.1"),
            "tcp:0:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_listen_backlog("tcp:1:backlog=5"), "tcp:1:backlog=5")
        self.assertEqual(with_listen_backlog("unix:/tmp/s"), "unix:/tmp/s")
