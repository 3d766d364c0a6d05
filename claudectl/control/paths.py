"""Where the control socket lives."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from claudectl.home import Home

#: AF_UNIX paths are limited to about 104-108 bytes.
MAX_SOCKET_PATH = 100


def control_socket_path(home: Home) -> Path:
    """
    ``~/.claudectl/relay/run/ctl.sock``, or -- when that path is too long for
    a UNIX socket (deep temporary homes) -- a private directory under the
    system temp dir named after the home, which server and clients agree on.
    """
    path = home.control_socket
    if len(os.fsencode(str(path))) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(str(home.root))).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"claudectl-{os.getuid()}-{digest}" / "ctl.sock"


def ensure_socket_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
