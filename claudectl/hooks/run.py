"""
The hook command as a script: ``python -S <this file> EVENT [--home DIR]``.

``claudectl hooks install`` points Claude Code at this file with ``-S``: the
hook needs only the standard library and this package, and skipping the
``site`` module (every ``.pth`` file of every installed package) is most of
a Python start-up.  The directory holding the ``claudectl`` package goes on
``sys.path`` first.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from claudectl.hooks.entry import main

    main()
