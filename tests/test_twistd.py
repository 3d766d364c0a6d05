"""
``twistd claudectl-relay`` for real: the dropin is found (from the checkout
and after a plain, non-editable ``pip install``), the service starts in the
foreground, logs where it listens, and shuts down cleanly on SIGTERM.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.common import ServeProcess, subprocess_env, temp_home

REPO = Path(__file__).resolve().parent.parent
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class TwistdTests(SynchronousTestCase):
    def test_help_lists_plugin(self) -> None:
        home = temp_home(self)
        r = subprocess.run(
            [sys.executable, "-c", TWISTD, "--help"],
            capture_output=True,
            text=True,
            env=subprocess_env(home),
            cwd=str(home.root),
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("claudectl-relay", r.stdout)
        self.assertIn("claudectl-hub", r.stdout)

    def test_plugin_help(self) -> None:
        home = temp_home(self)
        r = subprocess.run(
            [sys.executable, "-c", TWISTD, "claudectl-relay", "--help"],
            capture_output=True,
            text=True,
            env=subprocess_env(home),
            cwd=str(home.root),
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        for opt in ("--listen", "--port", "--config", "--home", "--no-discovery"):
            self.assertIn(opt, r.stdout)

    def test_foreground_run_and_sigterm(self) -> None:
        home = temp_home(self)
        proc = ServeProcess(
            home,
            [
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=-",
                "claudectl-relay",
                "--home",
                str(home.root),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--no-discovery",
            ],
        )
        self.addCleanup(proc.stop)
        port = proc.port()
        self.assertGreater(port, 0)
        proc.expect("control socket at")
        proc.expect(r"relay .* ready")  # the reactor runs: signals are handled
        # twistd re-raises the signal after a clean shutdown.
        self.assertIn(proc.stop(), (0, -15))
        proc.expect("Server Shut Down")
        self.assertTrue(home.identity_file.exists())


class InstalledDropinTests(SynchronousTestCase):
    """After ``pip install .`` (not editable) twistd must still find the dropin."""

    def test_pip_install_then_twistd(self) -> None:
        target = Path(self.mktemp()).absolute()
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(target)
        py = str(target / "bin" / "python")
        # The dependencies come from the environment running the tests (a
        # virtualenv's own packages are not "system site packages").
        nested_site = subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        outer = sysconfig.get_paths()["purelib"]
        Path(nested_site, "_claudectl_test_outer.pth").write_text(outer + "\n")
        r = subprocess.run(
            [
                py,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                str(REPO),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        site = subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.assertTrue((Path(site) / "twisted" / "plugins" / "claudectl_relay.py").exists())
        self.assertFalse((Path(site) / "twisted" / "plugins" / "__init__.py").exists())
        # Run from an unrelated directory so the checkout is not on sys.path.
        elsewhere = Path(self.mktemp()).absolute()
        elsewhere.mkdir()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere)}
        r = subprocess.run(
            [py, "-c", TWISTD, "--help"],
            capture_output=True,
            text=True,
            cwd=str(elsewhere),
            env=env,
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("claudectl-relay", r.stdout)
        self.assertIn("claudectl-hub", r.stdout)  # the second dropin (issue 17)
        r = subprocess.run(
            [str(target / "bin" / "claudectl"), "--home", str(elsewhere), "relay", "identity"],
            capture_output=True,
            text=True,
            cwd=str(elsewhere),
            env=env,
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
