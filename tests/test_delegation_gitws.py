"""Git workspaces: which sources are allowed, the killable git runner, real checkouts."""

import os
import shutil
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.config import DelegationConfig
from claudectl.delegation import gitws
from claudectl.delegation import payloads as P
from claudectl.delegation.store import INCOMING, TaskStore
from claudectl.delegation.worker import DelegationWorker
from tests.common import FakeMesh, temp_home
from tests.test_delegation_process import live_group_members
from tests.test_delegation_worker import Spawner

GIT = shutil.which("git")


class SourceTests(SynchronousTestCase):
    def test_file_urls_are_local_paths(self):
        self.assertEqual(gitws.parse_source("file:///srv/proj"), (gitws.LOCAL, "/srv/proj"))
        self.assertEqual(
            gitws.parse_source("FILE://localhost/srv/a%20b"), (gitws.LOCAL, "/srv/a b")
        )
        self.assertEqual(gitws.parse_source("/srv/proj"), (gitws.LOCAL, "/srv/proj"))
        # "host:path" without a user is not a remote here: not absolute, so refused later.
        self.assertEqual(gitws.parse_source("host:repo"), (gitws.LOCAL, "host:repo"))

    def test_network_remotes(self):
        for url in ("https://h/o/r.git", "ssh://git@h/o/r", "git://h/r", "git@h:o/r.git"):
            self.assertEqual(gitws.parse_source(url), (gitws.REMOTE, url))

    def test_refused_sources(self):
        for source in (
            "",
            "-u",
            "ext::sh -c id",
            "http://h/r",
            "ftp://h/r",
            "file://other-host/srv/x",
            "file:///srv/x?q",
            "/srv/\0x",
            "/srv/\nx",
            "file:///srv/%00x",
        ):
            self.assertRaises(gitws.WorkspaceError, gitws.parse_source, source)

    def test_allowed_git_remotes(self):
        allowed = ["https://git.example/org", "git@git.example:", "ssh://h/team/"]
        yes = [
            "https://git.example/org",
            "https://git.example/org/r.git",
            "git@git.example:any/r.git",
            "ssh://h/team/r",
        ]
        no = [
            "https://git.example/org-evil/r",
            "https://git.example/orgx",
            "https://git.example/org/../evil/r",
            "https://git.example/org/./r",
            "https://git.example/org/%2E%2E/evil",
            "https://git.example/org/a%2fb",
            "git@git.example.evil:r",
            "ssh://h/team",
            "https://evil/org/r",
            "https://git.example/org/r x",
        ]
        for url in yes:
            self.assertTrue(gitws.remote_allowed(url, allowed), url)
        for url in no:
            self.assertFalse(gitws.remote_allowed(url, allowed), url)
        self.assertFalse(gitws.remote_allowed("https://git.example/org/r", []))
        self.assertTrue(gitws.remote_allowed("git@anything:r", ["*"]))

    def test_git_env(self):
        env = gitws.git_env({"PATH": "/bin", "HOME": "/h", "SECRET": "s", "SSH_AUTH_SOCK": "/a"})
        self.assertEqual(
            env,
            {
                "PATH": "/bin",
                "HOME": "/h",
                "SSH_AUTH_SOCK": "/a",
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ALLOW_PROTOCOL": "https:ssh:git:file",
            },
        )

    def test_refs_and_commits(self):
        for ref in ("-x", "a b", "a..b", ""):
            self.assertRaises(gitws.WorkspaceError, gitws.check_ref, ref)
        gitws.check_ref("feat/auth")
        self.assertRaises(gitws.WorkspaceError, gitws.check_commit, "main")
        gitws.check_commit("c0ffee")


def make_repo(path, name, content):
    subprocess.run([GIT, "init", "-q", "-b", "main", str(path)], check=True)
    (path / name).write_text(content)
    subprocess.run([GIT, "-C", str(path), "add", "."], check=True)
    subprocess.run(
        [
            GIT,
            "-C",
            str(path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ],
        check=True,
    )


class RealGitTests(TestCase):
    timeout = 30
    if GIT is None:
        skip = "git is not installed"

    def worker(self, home, project):
        self.mesh = FakeMesh("worker-1", peers=["ctl-1"])
        self.spawner = Spawner()
        w = DelegationWorker(
            identity="worker-1",
            config=DelegationConfig(allowed_dirs=(str(project),), claude_command="/bin/sh"),
            mesh=self.mesh,
            store=TaskStore(home.tasks, INCOMING),
            trust_of=lambda p: 1.0,
            clock=reactor,
            spawner=self.spawner,
            home_root=home.root,
            run_git=gitws.default_git_runner(reactor),
            kill=lambda *a: None,
            sweep=lambda tags: [],
        )
        w.start()
        self.addCleanup(lambda: w._loop.running and w._loop.stop())
        return w

    async def test_file_url_cannot_reach_a_repository_outside_allowed_dirs(self):
        home = temp_home(self)
        project = home.root / "proj"
        project.mkdir()
        secret = Path(self.mktemp()).absolute()
        make_repo(secret, "SECRET.txt", "top secret\n")
        inside = project / "repo"
        make_repo(inside, "README", "hello\n")
        w = self.worker(home, project)
        w.on_delegate(
            "ctl-1",
            type(
                "E",
                (),
                {
                    "payload": P.build_delegate_task(
                        "t1",
                        "read SECRET.txt",
                        str(project),
                        P.TaskContext(git_remote="file://" + str(secret), git_ref="main"),
                    )
                },
            )(),
        )
        (h,) = [p for _, t, p in self.mesh.sent if t == "task_handoff"]
        self.assertIn("is not under [delegation] allowed_dirs", h["summary"])
        # The same through a file:// URL inside allowed_dirs works.
        w.on_delegate(
            "ctl-1",
            type(
                "E",
                (),
                {
                    "payload": P.build_delegate_task(
                        "t2",
                        "read README",
                        str(project),
                        P.TaskContext(git_remote="file://" + str(inside), git_ref="main"),
                    )
                },
            )(),
        )
        for _ in range(200):
            if self.spawner.calls:
                break
            await deferLater(reactor, 0.05, lambda: None)
        workspace = Path(self.spawner.calls[0]["path"])
        self.assertEqual(workspace, home.tasks / "workspaces" / "ctl-1--t2")
        self.assertEqual((workspace / "README").read_text(), "hello\n")
        self.assertFalse((workspace / "SECRET.txt").exists())

    async def test_cancelling_kills_the_whole_git_group(self):
        cwd = Path(self.mktemp()).absolute()
        cwd.mkdir()
        pidfile = cwd / "pid"
        run_git = gitws.default_git_runner(reactor)
        d = run_git(["-c", f"alias.slow=!echo $$ > {pidfile}; exec sleep 30", "slow"], str(cwd))
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await deferLater(reactor, 0.02, lambda: None)
        shell = int(pidfile.read_text())
        pgid = os.getpgid(shell)
        self.assertNotEqual(pgid, os.getpgid(0))  # git runs in its own group
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        deadline = time.monotonic() + 5
        while live_group_members(pgid) and time.monotonic() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(live_group_members(pgid), [])

    async def test_runner_reports_output_and_status(self):
        run_git = gitws.default_git_runner(reactor)
        out, err, code = await run_git(["--version"], str(Path.cwd()))
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith(b"git version"))
        out, err, code = await run_git(["no-such-command-xyz"], str(Path.cwd()))
        self.assertNotEqual(code, 0)
        self.assertIn(b"no-such-command-xyz", err)
