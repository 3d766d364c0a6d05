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


class UnsafeSocketDir(Exception):
    """The control socket's directory is not ours alone."""


def check_socket_dir(directory: Path) -> None:
    """The directory must be a real directory owned by us with mode 0700."""
    import stat

    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeSocketDir(
            f"{directory} is not a private directory of this user "
            "(owner and mode 0700); refusing to use it"
        )


def ensure_socket_dir(path: Path) -> None:
    """Create the socket's directory 0700, or raise UnsafeSocketDir (one clear line)."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(directory)
        if st.st_uid == os.getuid() and not os.path.islink(directory):
            os.chmod(directory, 0o700)
    except OSError as e:
        raise UnsafeSocketDir(
            f"cannot use {directory} for the control socket: {e.strerror or e}"
        ) from None
    try:
        check_socket_dir(directory)
    except UnsafeSocketDir as e:
        hint = (
            ""
            if directory.name == "run"
            else " (someone else made it: remove it, or use a home with a shorter path)"
        )
        raise UnsafeSocketDir(f"{e}{hint}") from None


def remove_fallback_dir(home: Home) -> None:
    """Remove the temp-dir fallback directory once its socket is gone."""
    path = control_socket_path(home)
    if path.parent != home.run_dir:
        try:
            path.parent.rmdir()
        except OSError:
            pass
