"""Tests for claudectl.home: resolving the home and the paths under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.home import HOME_ENV, Home
from tests.common import subprocess_env, temp_home


class ResolveTests(SynchronousTestCase):
    def test_explicit_wins(self) -> None:
        home = Home.resolve("/srv/a", environ={HOME_ENV: "/srv/b", "HOME": "/srv/c"})
        self.assertEqual(home.root, Path("/srv/a"))

    def test_env(self) -> None:
        self.assertEqual(Home.resolve(None, environ={HOME_ENV: "/srv/b"}).root, Path("/srv/b"))
        # An empty CLAUDECTL_HOME or --home counts as not given.
        self.assertEqual(Home.resolve("", environ={HOME_ENV: "/srv/b"}).root, Path("/srv/b"))

    def test_relative_made_absolute(self) -> None:
        home = Home.resolve("rel/dir", environ={})
        self.assertTrue(home.root.is_absolute())
        self.assertEqual(home.root, Path.cwd() / "rel" / "dir")

    def test_tilde_expanded(self) -> None:
        home = Home.resolve("~/x", environ={})
        # tests/__init__ points HOME at a throw-away directory.
        self.assertEqual(home.root, Path(os.environ["HOME"]) / "x")

    def test_fallback_is_user_home(self) -> None:
        # tests/__init__ points HOME at a throw-away directory.
        self.assertEqual(Home.resolve(None, environ={HOME_ENV: ""}).root, Path(os.environ["HOME"]))
        self.assertNotEqual(str(Home.resolve(None, environ={}).root), "~")

    def test_default_environ_is_os_environ(self) -> None:
        self.assertEqual(Home.resolve().root, Path(os.environ[HOME_ENV]).absolute())

    def test_safety_net(self) -> None:
        """The suite never runs against the real home."""
        self.assertIn("claudectl-tests-home-", os.environ["HOME"])
        self.assertEqual(os.environ[HOME_ENV], os.environ["HOME"])


class LayoutTests(SynchronousTestCase):
    def test_claudectl_paths(self) -> None:
        home = Home(Path("/h"))
        self.assertEqual(home.data, Path("/h/.claudectl"))
        self.assertEqual(home.relay, Path("/h/.claudectl/relay"))
        self.assertEqual(home.peers, Path("/h/.claudectl/relay/peers"))
        self.assertEqual(home.identity_file, Path("/h/.claudectl/relay/identity"))
        self.assertEqual(home.hive, Path("/h/.claudectl/hive"))
        self.assertEqual(home.config_file, Path("/h/.config/claudectl/config.toml"))
        self.assertEqual(home.control_socket.parent, home.run_dir)
        self.assertTrue(str(home.run_dir).startswith(str(home.relay)))

    def test_ensure_private_dir(self) -> None:
        home = temp_home(self)
        path = home.ensure_private_dir(home.run_dir)
        self.assertTrue(path.is_dir())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
        home.ensure_private_dir(home.run_dir)  # idempotent


class CliResolutionTests(SynchronousTestCase):
    """``--home`` and ``CLAUDECTL_HOME`` as the real command line sees them."""

    def run_identity(self, env: dict[str, str], *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "claudectl", *args, "relay", "identity"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_home_option_beats_env(self) -> None:
        env_home, opt_home = temp_home(self), temp_home(self)
        ident = self.run_identity(
            subprocess_env(env_home, HOSTNAME="boxa"), "--home", str(opt_home.root)
        )
        self.assertRegex(ident, r"^boxa-[0-9a-f]{8}$")
        self.assertEqual(opt_home.identity_file.read_text(), ident)
        self.assertFalse(env_home.data.exists())

    def test_env_home(self) -> None:
        home = temp_home(self)
        env = subprocess_env(home, HOSTNAME="boxb")
        env["HOME"] = str(temp_home(self).root)  # CLAUDECTL_HOME wins over HOME
        ident = self.run_identity(env)
        self.assertEqual(home.identity_file.read_text(), ident)
