"""
A fake ``claude`` for the tests: prints realistic stream-json.

Run as ``python fake_claude.py -p --output-format stream-json --verbose
--input-format stream-json``; the prompt arrives on stdin as a stream-json
user message (as claudectl sends it).  Without ``--input-format`` the prompt
is the last argument.

The variant is picked by a word ``fake:<variant>`` in the prompt:

* ``succeed`` (default) -- a session that edits a file and succeeds, exit 0;
* ``fail`` -- like Claude Code without a login: ``is_error`` true, exit 0;
* ``crash`` -- some output, a message on stderr, exit 3, no result;
* ``noresult`` -- exit 0 without a result event;
* ``hang`` -- starts a grandchild and sleeps until killed (ignores SIGTERM
  with ``fake:hang-hard``);
* ``nudge`` -- waits for a second user message and answers with its text;
* ``slow`` -- like ``succeed`` but pauses 0.3 s between events;
* ``busy`` -- a few tool uses and a text with escape sequences, then ``hang``.

Extra words start leftovers before the variant runs (process-cleanup tests):

* ``+daemon`` -- a grandchild with its stdio on /dev/null that ignores
  SIGTERM (like ``nohup server &`` from the Bash tool);
* ``+escape`` -- a grandchild that leaves the process group (``setsid``) but
  keeps our stdout open (a daemonizing dev server).

``fake:edit`` writes ``fake-claude.txt`` in the working directory.  The
received argv and prompt are written to ``$FAKE_CLAUDE_LOG`` if set
(``CLAUDE_FAKE_LOG`` also works, since that name reaches the child).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

SESSION = str(uuid.UUID(int=0x5E55))


def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def read_user_message():
    line = sys.stdin.readline()
    if not line:
        return None
    event = json.loads(line)
    content = event["message"]["content"]
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def assistant(text=None, tool=None, msg_id=None, tokens=(10, 5)):
    content = []
    if text is not None:
        content.append({"type": "text", "text": text})
    if tool is not None:
        content.append({"type": "tool_use", "id": "toolu_1", "name": tool[0], "input": tool[1]})
    return {
        "type": "assistant",
        "message": {
            "id": msg_id or str(uuid.uuid4()),
            "model": "claude-fake",
            "role": "assistant",
            "stop_reason": None,
            "type": "message",
            "usage": {
                "input_tokens": tokens[0],
                "output_tokens": tokens[1],
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
            "content": content,
        },
        "parent_tool_use_id": None,
        "session_id": SESSION,
        "uuid": str(uuid.uuid4()),
    }


def result(text, is_error=False, cost=0.0123, turns=2):
    return {
        "type": "result",
        "subtype": "success",
        "is_error": is_error,
        "duration_ms": 1234,
        "duration_api_ms": 1000,
        "num_turns": turns,
        "result": text,
        "stop_reason": "end_turn",
        "session_id": SESSION,
        "total_cost_usd": cost,
        "usage": {
            "input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "cache_read_input_tokens": 30,
            "output_tokens": 50,
        },
        "permission_denials": [],
        "terminal_reason": "completed",
        "uuid": str(uuid.uuid4()),
    }


def main(argv):
    stream_input = "--input-format" in argv
    prompt = read_user_message() if stream_input else argv[-1]
    log = os.environ.get("FAKE_CLAUDE_LOG") or os.environ.get("CLAUDE_FAKE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {"argv": argv, "prompt": prompt, "cwd": os.getcwd(), "env": sorted(os.environ)}
                )
                + "\n"
            )
    match = re.search(r"fake:([a-z-]+)", prompt or "")
    variant = match.group(1) if match else "succeed"
    emit(
        {
            "type": "system",
            "subtype": "init",
            "cwd": os.getcwd(),
            "session_id": SESSION,
            "tools": ["Bash", "Edit", "Read", "Write"],
            "mcp_servers": [],
            "model": "claude-fake",
            "permissionMode": "default",
            "apiKeySource": "none",
            "claude_code_version": "0.0.0-fake",
            "uuid": str(uuid.uuid4()),
        }
    )
    pause = 0.3 if variant == "slow" else 0.0
    if "+daemon" in (prompt or ""):
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    if "+escape" in (prompt or ""):
        subprocess.Popen(
            [sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"],
            stdin=subprocess.DEVNULL,
        )

    if variant == "fail":
        emit(
            dict(
                assistant("Not logged in · Please run /login", tokens=(0, 0)),
                error="authentication_failed",
            )
        )
        emit(result("Not logged in · Please run /login", is_error=True, cost=0, turns=1))
        return 0
    if variant == "crash":
        emit(assistant("Starting work"))
        sys.stderr.write("fatal: the fake claude crashed\n")
        return 3
    if variant == "noresult":
        emit(assistant("I will just stop"))
        return 0
    if variant == "busy":
        # Some visible work (for the live tail), then hang.
        emit(assistant(None, tool=("Bash", {"command": "pytest -q tests/"})))
        emit(assistant("Running the tests \x1b[31mnow\x1b[0m\x1b]0;pwned\x07"))
        emit(assistant(None, tool=("Read", {"file_path": "/srv/proj/a.py"})))
        variant = "hang"
    if variant.startswith("hang"):
        if variant == "hang-hard":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # A grandchild holding our pipes: only a group kill ends it.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        emit(assistant("Working on it"))
        while True:
            time.sleep(1)
    if variant == "nudge":
        emit(assistant("Waiting for a nudge"))
        nudge = read_user_message()
        emit(assistant(f"Got nudge: {nudge}"))
        emit(result(f"Nudged with: {nudge}"))
        return 0

    # succeed / slow / edit
    emit(assistant("Looking at the code", msg_id="msg_a"))
    time.sleep(pause)
    path = os.path.join(os.getcwd(), "fake-claude.txt")
    if "fake:edit" in (prompt or ""):
        with open(path, "w", encoding="utf-8") as f:
            f.write("edited by the fake claude\n")
    emit(
        assistant(
            None,
            tool=("Edit", {"file_path": path, "old_string": "a", "new_string": "b"}),
            msg_id="msg_a",
        )
    )
    emit(
        {
            "type": "user",
            "message": {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}],
            },
            "parent_tool_use_id": None,
            "session_id": SESSION,
            "uuid": str(uuid.uuid4()),
        }
    )
    time.sleep(pause)
    emit(assistant("All done", msg_id="msg_b"))
    time.sleep(pause)
    text = "Done: " + (prompt or "")
    emit(result(text))
    if stream_input:
        # Like Claude Code: wait for stdin to close before exiting.
        while sys.stdin.readline():
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
