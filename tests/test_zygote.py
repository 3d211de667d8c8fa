"""tests/zygote.py: a python command a test starts from the zygote behaves as the same command exec'd (what its
own output, exit code, signals and process group are), and it was forked (torch already imported)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import zygote

SCRIPT = textwrap.dedent("""
    import os, sys
    print("preloaded" if "torch" in sys.modules else "fresh", file=sys.stderr)
    print(sys.argv[1:], os.path.basename(os.getcwd()), os.environ.get("ZYGOTE_TEST"), sys.stdin.read().strip())
    print(__name__, sys.path[0] == os.path.dirname(os.path.abspath(__file__)), flush=True)
    if sys.argv[1] == "raise":
        raise ValueError("boom")
    if sys.argv[1] == "message":
        sys.exit("a message")
    if sys.argv[1] == "sleep":
        import time
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
""")


def _run(popen, script, arg: str, cwd) -> tuple[int, str, str]:
    env = zygote._entry_env({**os.environ, "ZYGOTE_TEST": "env seen"})
    proc = popen([sys.executable, str(script), arg, "x y"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate("from stdin", timeout=120)
    return proc.returncode, out, err


def test_a_forked_command_does_what_the_exec_one_does(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(SCRIPT)
    (tmp_path / "here").mkdir()
    for arg in ("3", "0", "raise", "message"):
        forked = _run(subprocess.Popen, script, arg, tmp_path / "here")
        execed = _run(zygote._EXEC_POPEN, script, arg, tmp_path / "here")
        assert forked[2].startswith("preloaded") and execed[2].startswith("fresh"), (forked, execed)
        assert forked[:2] == execed[:2], (arg, forked, execed)
        assert forked[2].splitlines()[1:] == execed[2].splitlines()[1:], (arg, forked, execed)
    assert execed[0] == 1 and "a message" in execed[2]
    assert "['3', 'x y'] here env seen from stdin" in _run(subprocess.Popen, script, "3", tmp_path / "here")[1]


def test_a_forked_command_is_this_process_child_in_its_own_session_and_dies_by_signal(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "sleep", "x"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, env=zygote._entry_env(dict(os.environ)), start_new_session=True,
                            text=True)
    assert proc.stdout.readline().strip().endswith("None")  # running: it printed its first line
    assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
    with open(f"/proc/{proc.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # its parent is this process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_a_forked_command_is_in_its_session_or_group_when_popen_returns(tmp_path):
    """As exec'd Popen guarantees (its child sets them before exec): read right away, the pid's session and group
    are the ones asked for. jupyter_client records a kernel's group this way and signals it on shutdown; read
    before the child's setsid it was this worker's group, so the shutdown signalled the worker."""
    script = tmp_path / "cmd.py"
    script.write_text(SCRIPT)
    # The child is slowed before it sets its session or group, as a loaded host may slow it.
    env = zygote._entry_env({**os.environ, "ZYGOTE_TEST_SESSION_DELAY_S": "0.3"})
    for extra in [{"start_new_session": True}, {"process_group": 0}] * 2:
        proc = subprocess.Popen([sys.executable, str(script), "sleep", "x"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **extra)
        try:
            pgid, sid = os.getpgid(proc.pid), os.getsid(proc.pid)
            assert pgid == proc.pid, extra
            assert (sid == proc.pid) == ("start_new_session" in extra), extra
            assert proc.stderr.readline().startswith("preloaded")  # it was forked, not exec'd
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()


@pytest.mark.parametrize("slowed", ["ZYGOTE_TEST_SESSION_DELAY_S", "ZYGOTE_TEST_INTERMEDIATE_DELAY_S"])
def test_a_forked_commands_parent_is_its_starter_from_its_first_line(tmp_path, slowed):
    """The zygote forks through an intermediate that exits at once; whichever of the command and that exit comes
    first (the command slowed, or the intermediate), the command runs to its end and its first getppid() is this
    process, as exec'd."""
    script = tmp_path / "ppid.py"
    script.write_text("import os\nprint(os.getppid())\n")
    env = zygote._entry_env({**os.environ, slowed: "0.3"})
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, str(os.getpid())), proc.stderr


NESTED = textwrap.dedent("""
    import json, os, subprocess, sys
    def me():
        return [os.getpid(), os.getppid(), os.getpgrp(), os.getsid(0), "torch" in sys.modules]
    if len(sys.argv) > 1:
        print(json.dumps(me()))
        sys.exit(0)
    rows = {"parent": me()}
    for name, flags, extra in (("group", [], {}), ("own group", [], {"process_group": 0}), ("-u", ["-u"], {})):
        proc = subprocess.run([sys.executable, *flags, __file__, "child"], capture_output=True, text=True, **extra)
        rows[name] = json.loads(proc.stdout)
    print(json.dumps(rows))
""")


def test_a_forked_commands_own_python_commands_are_forked_as_its_children(tmp_path):
    """What a launcher's trainer or torchrun's workers are to their starter: its children, in its session and
    process group (or their own group when asked), as exec'd; forked (torch already imported) when it was."""
    import json

    script = tmp_path / "nested.py"
    script.write_text(NESTED)
    env = zygote._entry_env(dict(os.environ))
    for popen, forked in ((subprocess.Popen, True), (zygote._EXEC_POPEN, False)):
        proc = popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=120)  # EOF when it ends: nothing else holds its stdout
        rows = json.loads(out)
        parent = rows.pop("parent")
        assert parent[1] == os.getpid() and parent[4] is forked
        for name, (pid, ppid, pgid, sid, preloaded) in rows.items():
            assert (ppid, sid, preloaded) == (parent[0], parent[3], forked), (name, rows)
            assert pgid == (pid if name == "own group" else parent[2]), (name, rows)
