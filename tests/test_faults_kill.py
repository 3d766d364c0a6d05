"""
kill -9 during a trust update and during a key write, 20 times each (issue
11, fault injection).  Afterwards every file parses, nothing a finished
command wrote is lost, and the next service start leaves no temp file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.crypto import psk_from_code
from claudectl.relay.keystore import KeyStore, is_valid_peer_id
from tests.common import ServeProcess, subprocess_env, temp_home
from tests.test_faults_process import fake_peers, temp_files

ROUNDS = 20


def kill_during(
    proc: subprocess.Popen[bytes], directory: str, prefix: str, rng: random.Random, r: int
) -> int:
    """SIGKILL ``proc`` once a temp file starting with ``prefix`` shows (or at random)."""
    if r % 4 == 3:
        time.sleep(rng.uniform(0.05, 0.6))  # anywhere: start-up, lock, write, rename
    else:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(directory)):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.0002)
    proc.send_signal(signal.SIGKILL)
    return proc.wait(10)


def start_and_check_clean(testcase: SynchronousTestCase, home: object) -> None:
    time.sleep(1.1)  # the sweep leaves temp files younger than 1 s alone
    serve = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")  # type: ignore
    testcase.addCleanup(serve.stop)
    serve.port()
    # Looked at once the service has stopped: a temp file of its own write
    # in progress (the distillation state, say) is not a leftover.
    testcase.assertEqual(serve.stop(), 0)
    testcase.assertEqual(temp_files(home), [])  # type: ignore[arg-type]


class KillDuringTrustUpdateTests(SynchronousTestCase):
    def test_kill_loop(self) -> None:
        home = temp_home(self)
        KeyStore(home).ensure_identity()
        peers = fake_peers(home, 3000)  # a big trust.json: a longer write
        rng = random.Random(7)
        env = subprocess_env(home)
        expected: dict[str, float] = {}
        landed = 0
        for r in range(ROUNDS):
            peer = peers[r]
            level = round(0.1 + 0.04 * r, 2)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "claudectl",
                    "--home",
                    str(home.root),
                    "hive",
                    "trust",
                    peer,
                    str(level),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            rc = kill_during(proc, str(home.hive), ".trust.json.", rng, r)
            landed += bool(temp_files(home))
            data = json.loads((home.hive / "trust.json").read_text())  # always parses
            self.assertEqual(len(data), len(peers))
            if rc == 0:
                expected[peer] = level
            elif data[peer]["trust_level"] != 0.5:
                expected[peer] = level  # killed after the rename: the new value
            for p, want in expected.items():
                self.assertEqual(data[p]["trust_level"], want, p)
            self.assertIn(data[peer]["trust_level"], (0.5, level))
        self.assertGreater(landed, 0, "no kill landed inside a write: the test proved nothing")
        start_and_check_clean(self, home)


class KillDuringKeyWriteTests(SynchronousTestCase):
    def test_kill_loop(self) -> None:
        home = temp_home(self)
        ks = KeyStore(home)
        ks.ensure_identity()
        rng = random.Random(5)
        env = subprocess_env(home)
        stored: dict[str, bytes] = {}
        for r in range(ROUNDS):
            code = f"{r:04x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-0000"
            peer = f"keypeer-{r:02d}"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "claudectl",
                    "--home",
                    str(home.root),
                    "relay",
                    "accept",
                    code,
                    peer,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            rc = kill_during(proc, str(home.peers), f".{peer}.key.", rng, r)
            key = ks.key(peer)
            if rc == 0:
                self.assertEqual(key, psk_from_code(code))
            if key is not None:
                self.assertEqual(key, psk_from_code(code))  # whole or absent
                stored[peer] = key
            elif (home.peers / f"{peer}.key").exists():
                self.fail(f"{peer}.key exists but does not parse")
            for p, k in stored.items():
                self.assertEqual(ks.key(p), k, p)
            for name in os.listdir(home.peers) if home.peers.exists() else []:
                if name.endswith(".key"):
                    self.assertTrue(is_valid_peer_id(name[:-4]), name)
        start_and_check_clean(self, home)
