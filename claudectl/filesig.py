# -*- test-case-name: tests.test_statestore -*-
"""
A file's ``stat()`` signature: has it changed since we last looked?

Twisted-free (the Claude Code hooks read the hive through modules that
import this; see :mod:`claudectl.lazylog`).
"""

from __future__ import annotations

import os
from pathlib import Path

#: (mtime_ns, size, inode), or None when the file is missing.
Signature = tuple[int, int, int] | None


def signature(path: str | Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
