"""Python processes the tests start, forked from an interpreter that has already imported torch.

A trainer started by a test spends ~5 s on a slow host importing torch, torch._dynamo (every optimizer's constructor
imports it) and matplotlib before its first line of work, and the suite starts dozens. Here one process per xdist
worker (the zygote) imports those once and forks for each `python script.py ...`, `python -m pretrain...`
(torchrun's `-m torch.distributed.run`, Jupyter's kernel) or `python -c ...` a test starts with `subprocess`: the
child becomes that command (its argv, cwd, environment, stdin/stdout/stderr, new session or process group) and runs
it as `python` would, `__main__`, atexit handlers and exit code included. It is the test's own child, so `wait`,
`send_signal`, kill -9 and process groups behave as with exec: the zygote forks through an intermediate that exits
at once, and the test's worker, a child subreaper (prctl) while it asks, adopts the command. A forked command's own
python commands (a launcher's trainer, torchrun's workers) are forked the same way from its template: a copy of it
made before its code runs, its child, so they are its children.

Only the third-party packages are imported ahead (this repo's modules read settings when the command imports
them), in the environment this repo's entry points give torch before it loads (OpenMP's spin, huge pages:
pretrain/train/host_threads.py, host_alloc.py), so a script or `-m` command is forked when its environment,
with those added as its entry adds them, matches in what a package reads at import (threads, torch, python
settings); a `-c` command must match as it is. Anything else runs as before (exec): another program, python
flags (-X; -u, torchrun's, is taken), pass_fds, preexec_fn, another environment. PRETRAIN_TEST_EXEC=1 turns the
zygote off: in the tests' environment for all, in a command's for it and what it starts (/proc shows a forked
process's command line and environment as the zygote's).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "numpy", "matplotlib.figure", "matplotlib.backends.backend_agg")
# Environment read at import (by libgomp, torch, python itself): a command whose values differ is exec'd.
_IMPORT_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "PYTORCH", "CUDA", "PYTHON", "LD_", "MALLOC", "THP_",
               "MPLBACKEND", "PRETRAIN_MKL_ON_AMD")
_PR_SET_CHILD_SUBREAPER = 36
_MODULES = ("pretrain", "torch.distributed.run", "ipykernel_launcher")  # `python -m` commands forked (+ scripts, -c)
_EXEC_ENV = "PRETRAIN_TEST_EXEC"  # "1": exec'd (in the test's environment: all; in a command's: it and its children)


# Read later, when used (PYTHONPATH: the child puts it on sys.path as python would; torchrun's settings for its
# workers: read by torch.distributed when a worker starts its process group).
_LAZY_ENV = ("PYTHONPATH", "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR", "TORCHELASTIC_", "TORCH_NCCL_")


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_ENV) and not k.startswith(_LAZY_ENV)}


@functools.cache
def _repo_module(rel: str) -> types.ModuleType:
    """A repo file run as a module of its own, not entered in sys.modules: a forked command imports this repo's
    modules itself, when and where it would (its sys.path may not even reach them)."""
    spec = importlib.util.spec_from_file_location(f"_zygote_{Path(rel).stem}", Path(__file__).parents[1] / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry_env(env: dict[str, str]) -> dict[str, str]:
    """`env` as this repo's entry points leave it before torch loads."""
    huge_pages = _repo_module("pretrain/train/host_alloc.py").with_huge_pages
    idle_threads_asleep = _repo_module("pretrain/train/host_threads.py").with_idle_threads_asleep
    return idle_threads_asleep(huge_pages(env))


# ---- the zygote (run as `python tests/zygote.py FD`) --------------------------------------------------------------

def _serve(sock: socket.socket) -> None:
    for name in PRELOAD:
        __import__(name)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except OSError:
            return
        if not msg:
            return
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(r)
            intermediate, req = os.getpid(), json.loads(msg)
            if os.fork() == 0:
                sock.close()
                if delay := float(req["env"].get("ZYGOTE_TEST_SESSION_DELAY_S", 0)):  # tests/test_zygote.py: a slow
                    time.sleep(delay)  # child, from its first instruction (before its session, group, anything)
                _become(req, fds, w, intermediate)
            if delay := float(req["env"].get("ZYGOTE_TEST_INTERMEDIATE_DELAY_S", 0)):  # tests/test_zygote.py
                time.sleep(delay)
            os._exit(0)
        os.close(w)
        pid = int(os.read(r, 32) or b"0")
        os.close(r)
        os.waitpid(middle, 0)  # the command is orphaned now: the worker (a subreaper) adopts it
        for fd in fds:
            os.close(fd)
        sock.send(str(pid).encode())


def _start_template() -> None:
    """In a forked command, before its code runs: fork a copy of this pristine process (its template) that forks
    the python commands this command starts, which are then its own children (it is their subreaper while it
    asks), as exec'd ones would be. The template has its own process group and no stdio, so a signal to the
    command's group or a reader waiting for EOF on its pipes never sees it; it exits when the command does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        try:
            ours.close()
            os.setpgid(0, 0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            keep = theirs.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            _serve(theirs)
        finally:
            os._exit(0)
    theirs.close()
    _ZYGOTE.sock = ours
    subprocess.Popen = ForkPopen  # type: ignore[misc]


def _text(fd: int, write: bool, errors: str, line: bool, unbuffered: bool):
    import io

    raw = io.FileIO(fd, "w" if write else "r", closefd=False)
    buf = io.BufferedWriter(raw) if write else io.BufferedReader(raw)
    return io.TextIOWrapper(buf, encoding="utf-8", errors=errors, line_buffering=line or raw.isatty(),
                            write_through=write and unbuffered)


def _report(e: BaseException) -> None:
    """The traceback python prints for an uncaught exception: from the command's own frames (not runpy's or ours)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
        tb = tb.tb_next
    sys.excepthook(type(e), e.with_traceback(tb), tb)


def _become(req: dict, fds: list[int], ready: int, intermediate: int) -> None:
    """In the forked child: turn into `req` (as exec would), run it, exit with its code. Never returns. Its pid goes
    to `ready` only once it is in its session or group: Popen returns after exec has set those, and a caller may read
    them at once (jupyter_client records the kernel's process group to signal it; read before the child's setsid,
    that was this worker's group, and the kernel's shutdown signalled the worker). Its code runs only once the
    intermediate has exited, so from its first line its parent is its starter, as exec'd (a loaded host may run the
    command before the intermediate's exit: a CI run saw the intermediate as a command's parent)."""
    import atexit
    import runpy
    import signal
    import types

    code = 1
    try:
        if req["session"]:
            os.setsid()
        elif req["group"] is not None:
            os.setpgid(0, req["group"])
        os.write(ready, str(os.getpid()).encode())
        os.close(ready)
        high = [os.dup(fd) for fd in fds]  # a received fd may itself be 0, 1 or 2
        for i, fd in enumerate(high):
            os.dup2(fd, i)
        for fd in {*fds, *high} - {0, 1, 2}:
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        _start_template()
        unbuffered = req["unbuffered"] or bool(req["env"].get("PYTHONUNBUFFERED"))
        sys.stdin = sys.__stdin__ = _text(0, False, "strict", False, False)
        sys.stdout = sys.__stdout__ = _text(1, True, "strict", False, unbuffered)
        sys.stderr = sys.__stderr__ = _text(2, True, "backslashreplace", True, unbuffered)
        while os.getppid() == intermediate:  # it exits at once, but until then it is the command's parent
            time.sleep(1e-4)
        kind, target, args = req["kind"], req["target"], req["args"]
        sys.path[1:1] = [os.path.abspath(p) for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        try:
            if kind == "script":
                sys.argv = [target, *args]
                sys.path[0] = str(Path(req["cwd"], target).resolve().parent)
                runpy.run_path(target, run_name="__main__")
            elif kind == "module":
                sys.argv = ["-m", *args]
                sys.path[0] = req["cwd"]
                runpy._run_module_as_main(target, alter_argv=True)  # what `python -m` calls
            else:
                sys.argv = ["-c", *args]
                sys.path[0] = ""
                main.__dict__["__builtins__"] = __builtins__
                exec(compile(target, "<string>", "exec"), main.__dict__)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt as e:
            _report(e)
            code = -signal.SIGINT
        except BaseException as e:
            _report(e)
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:  # as python does for an uncaught KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        os._exit(code & 0xFF if isinstance(code, int) else 1)


# ---- the client (in each pytest worker) ---------------------------------------------------------------------------

class _Zygote:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.import_env: dict[str, str] = {}  # what the zygote's packages read at import
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.failed = os.environ.get(_EXEC_ENV) == "1" or not sys.platform.startswith("linux")

    def _subreaper(self, on: bool) -> None:
        """Adopt orphaned descendants (on) or leave them to init (off): on only while a command is forked, so
        this worker is left no zombie of, say, a killed launcher's trainer."""
        if self.libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = _entry_env(dict(os.environ))
        self.import_env = _import_env(env)
        self.proc = _EXEC_POPEN([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours

    def spawn(self, req: dict, fds: list[int]) -> int | None:
        """The pid of the command, now this process's child; None when the zygote cannot run it."""
        with self.lock:
            if self.failed:
                return None
            try:
                if self.sock is None:
                    self._start()
                env = req["env"] if req["kind"] == "command" else _entry_env(req["env"])
                if _import_env(env) != self.import_env:
                    return None
                assert self.sock is not None
                self._subreaper(True)
                try:
                    socket.send_fds(self.sock, [json.dumps(req).encode()], fds)
                    pid = int(self.sock.recv(32) or b"0")
                finally:
                    self._subreaper(False)
            except OSError:
                self.failed = True
                return None
            return pid or None


_ZYGOTE = _Zygote()
_EXEC_POPEN = subprocess.Popen


def _request(args, executable, shell, cwd, env, pass_fds, preexec_fn, extra: dict) -> dict | None:
    """What to send the zygote for this Popen call, or None when it must be exec'd."""
    if shell or executable or pass_fds or preexec_fn or any(v not in (None, -1, False, ()) for v in extra.values()):
        return None
    argv = [os.fsdecode(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    env = {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None else env).items()}
    if len(argv) < 2 or argv[0] != sys.executable or (cwd and not os.path.isdir(cwd)) or env.get(_EXEC_ENV) == "1":
        return None  # (a missing cwd: exec raises FileNotFoundError here, as a test expects of Popen)
    unbuffered = argv[1] == "-u"  # torchrun starts its workers with -u
    if unbuffered:
        argv = argv[:1] + argv[2:]
    if argv[1] == "-m" and len(argv) > 2 and argv[2].startswith(_MODULES):
        kind, target, rest = "module", argv[2], argv[3:]
    elif argv[1] == "-c" and len(argv) > 2:
        kind, target, rest = "command", argv[2], argv[3:]
    elif argv[1].endswith(".py") and not argv[1].startswith("-"):
        kind, target, rest = "script", argv[1], argv[2:]
    else:
        return None
    return {"kind": kind, "target": target, "args": rest, "cwd": os.fspath(cwd) if cwd else os.getcwd(),
            "env": env, "unbuffered": unbuffered}


class ForkPopen(subprocess.Popen):
    """subprocess.Popen whose python commands come from the zygote (module docstring); the rest are exec'd."""

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, process_group):
        req = _request(args, executable, shell, cwd, env, pass_fds, preexec_fn,
                       {"gid": gid, "gids": gids, "uid": uid, "umask": umask})
        pid = None
        if req is not None:
            # Not in a group of its own: in this process's, as exec'd (the zygote's child is in the zygote's).
            req.update(session=bool(start_new_session),
                       group=os.getpgrp() if process_group in (None, -1) else process_group)
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2]
            pid = _ZYGOTE.spawn(req, fds)
        if pid is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, restore_signals, gid, gids, uid, umask, start_new_session,
                                          process_group)
        self.pid = pid
        self._child_created = True
        # As Popen does after exec: the parent closes the child's ends.
        if p2cread != -1 and p2cwrite != -1 and p2cread != getattr(self, "_devnull", None):
            os.close(p2cread)
        if c2pwrite != -1 and c2pread != -1 and c2pwrite != getattr(self, "_devnull", None):
            os.close(c2pwrite)
        if errwrite != -1 and errread != -1 and errwrite != getattr(self, "_devnull", None):
            os.close(errwrite)
        if hasattr(self, "_devnull"):
            os.close(self._devnull)
        self._closed_child_pipe_fds = True


def install() -> None:
    """Start python commands from the zygote in this process (a pytest worker) from now on."""
    subprocess.Popen = ForkPopen  # type: ignore[misc]


if __name__ == "__main__":
    _ZYGOTE.import_env = _import_env(dict(os.environ))  # what a command's template imported with
    _serve(socket.socket(fileno=int(sys.argv[1])))
