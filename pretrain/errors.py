"""Errors and exit codes of every command: a UserError becomes one line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pretrain.invocation import shown_prog

# A trainer stopped by a stop request (SIGTERM, SIGINT, SIGUSR1, SIGHUP) before it finished: its state is saved;
# rerun the same command to resume. EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), distinct from 0
# (finished, or nothing to do), 1 (failed), 2 (a user error) and 130 (an interrupted prepare), so retry loops
# and job schedulers can rerun exactly this case.
EXIT_STOPPED = 75


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("prog"):  # usage and error lines name the command the user typed (pretrain/invocation.py)
            kwargs["prog"] = shown_prog(kwargs["prog"])
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI main function, turning UserError into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`... --json | head`): not a failure of ours. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(code or 0)


def script_exit_code(main: Callable[[Sequence[str] | None], int | None]) -> int:
    """run_cli for a process entry point (scripts, `python -m`, console scripts): the exit code to exit with.

    Once main has returned the work is over (done, failed or interrupted), so SIGINT/SIGTERM are ignored from
    then on: a group signal (Ctrl-C, a container stop) that lands while the interpreter shuts down would
    otherwise turn a finished run into a silent death by signal (exit -2 with no message). Signals ignored
    are not reset by the interpreter's finalization; SIGKILL still ends a hung exit.
    """
    code = run_cli(main)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return code
