"""
Remote task delegation: run Claude Code on a peer and follow it live.

* :mod:`.payloads` -- the COMPAT wire payloads (``delegate_task`` & co).
* :mod:`.streamjson` -- Claude Code's ``stream-json`` output into progress.
* :mod:`.tail` -- the live tail of a task (optional ``task_status`` member).
* :mod:`.taskrun` -- one run of Claude Code as a reactor-free model.
* :mod:`.claude_process` -- spawning Claude Code (thin ProcessProtocol).
* :mod:`.store` -- task records under ``~/.claudectl/relay/tasks/``.
* :mod:`.worker` -- the side that runs tasks for peers.
* :mod:`.controller` -- the side that delegates and follows tasks.
* :mod:`.commands`, :mod:`.locator` -- the AMP control-channel commands.
* :mod:`.service` -- ``delegation_service(...)`` builds it over a mesh (the
  composition root, :mod:`claudectl.service.compose`, hangs it in the tree).
* :mod:`.taskfile`, :mod:`.runner` -- ``claudectl run <file>``.
"""
