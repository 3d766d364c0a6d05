"""``python -m claudectl.hooks EVENT [--home DIR]``: one Claude Code hook call."""

from claudectl.hooks.entry import main

main()
