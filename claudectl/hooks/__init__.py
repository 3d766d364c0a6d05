"""
Claude Code hooks that feed the hive and use it (docs/claude-code.md).

* :mod:`claudectl.hooks.entry`: the hook command Claude Code runs for each
  event (``python -m claudectl.hooks EVENT``); lean, never in the way.
* :mod:`claudectl.hooks.events`: what each event does -- the hive knowledge
  as a session's context, the user's permission decisions into
  ``decisions.jsonl``, the optional gate (:mod:`claudectl.hooks.gate`).
* :mod:`claudectl.hooks.settings`: ``claudectl hooks install`` and friends
  (Claude Code's ``settings.json``).

Nothing in this package imports Twisted.
"""
