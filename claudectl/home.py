# -*- test-case-name: tests.test_home -*-
"""
Where claudectl keeps its files.

A :class:`Home` stands for one user's home directory.  claudectl's data lives
in ``<home>/.claudectl`` and its user configuration in
``<home>/.config/claudectl/config.toml`` -- exactly where claudectl 0.64 puts
them, so both tools can share one home.

The home is resolved once, at the edge of the program (``--home``, else
``CLAUDECTL_HOME``, else the user's real home), and passed down.  Library code
never looks at ``~`` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

HOME_ENV = "CLAUDECTL_HOME"


@dataclass(frozen=True)
class Home:
    """The directories and files of one claudectl home."""

    root: Path

    @classmethod
    def resolve(
        cls, explicit: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
    ) -> Home:
        """
        Pick the home: an explicit path, else ``$CLAUDECTL_HOME``, else the
        user's home directory (looked up only now, never at import time).
        """
        env = os.environ if environ is None else environ
        if explicit:
            return cls(Path(explicit).expanduser().absolute())
        if env.get(HOME_ENV):
            return cls(Path(env[HOME_ENV]).expanduser().absolute())
        return cls(Path(os.path.expanduser("~")))

    # --- data under ~/.claudectl -------------------------------------------------
    @cached_property
    def data(self) -> Path:
        return self.root / ".claudectl"

    @cached_property
    def relay(self) -> Path:
        return self.data / "relay"

    @cached_property
    def peers(self) -> Path:
        return self.relay / "peers"

    @cached_property
    def identity_file(self) -> Path:
        return self.relay / "identity"

    @cached_property
    def tasks(self) -> Path:
        return self.relay / "tasks"

    @cached_property
    def invites(self) -> Path:
        return self.relay / "invites"

    @cached_property
    def run_dir(self) -> Path:
        """Private directory (0700) for the control socket."""
        return self.relay / "run"

    @cached_property
    def control_socket(self) -> Path:
        return self.run_dir / "ctl.sock"

    @cached_property
    def hive(self) -> Path:
        return self.data / "hive"

    @cached_property
    def brain(self) -> Path:
        return self.data / "brain"

    def state_dirs(self) -> list[Path]:
        """Every directory where stored state is written (atomic writes land here)."""
        dirs = [
            self.data,
            self.relay,
            self.peers,
            self.invites,
            self.run_dir,
            self.hive,
            self.brain,
            self.tasks,
            self.config_file.parent,
        ]
        try:
            dirs.extend(
                p
                for p in sorted(self.tasks.iterdir())
                if p.is_dir() and not p.is_symlink() and p.name != "workspaces"
            )
        except OSError:
            pass
        return dirs

    # --- configuration ----------------------------------------------------------
    @cached_property
    def config_file(self) -> Path:
        return self.root / ".config" / "claudectl" / "config.toml"

    def ensure_private_dir(self, path: Path) -> Path:
        """Create ``path`` (and parents) with mode 0700 if it is missing."""
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path
