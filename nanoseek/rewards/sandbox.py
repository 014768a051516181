"""Run untrusted code (model completions) in a subprocess with layered limits.

Layers, outermost first:
- the parent: a fresh temp dir as cwd and HOME, an empty environment (no inherited secrets), a new session (own
  process group) killed as a whole on wall-time timeout and again after exit (stray children), stdout/stderr
  written to files so the file-size limit also caps them;
- the child bootstrap (before any user code): rlimits for CPU seconds, address space, file size, number of
  processes and open files; a fresh network namespace (``unshare(CLONE_NEWNET)``, only loopback and down) when the
  kernel allows it; ``python -I -S`` isolation; an audit hook (PEP 578) that refuses sockets, process creation
  (fork/exec/spawn/subprocess/system), ctypes and writes outside the temp dir.

Caveat: RLIMIT_NPROC does not bind uid 0, so when the parent runs as root the fork-bomb defence is the audit hook
plus the process-group kill. The audit hook is defence in depth, not a proof against every escape.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child with ``python -I -S -c``; argv: limits, then the path of the program (deleted once read).
_BOOTSTRAP = r"""
import os, sys, resource, ctypes
cpu_s, mem, fsize, nproc, nofile, audit, program = sys.argv[1:]
for lim, val in ((resource.RLIMIT_CPU, int(cpu_s)), (resource.RLIMIT_AS, int(mem)), (resource.RLIMIT_FSIZE, int(fsize)),
                 (resource.RLIMIT_NPROC, int(nproc)), (resource.RLIMIT_NOFILE, int(nofile)), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
try:
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET; fails without privileges: fine
except Exception:
    pass
with open(program) as f:
    source = f.read()
os.remove(program)
root = os.path.realpath(os.getcwd())
del ctypes, resource, cpu_s, mem, fsize, nproc, nofile, program, f, lim, val

_BLOCKED = frozenset({"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.kill", "os.killpg",
                      "subprocess.Popen", "pty.spawn", "os.putenv", "os.unsetenv", "webbrowser.open"})
_PATH_EVENTS = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                          "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"})
_FROZEN_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})  # no rewiring of the hook itself

# Everything the hook uses is bound at definition time, so patching builtins or globals cannot disarm it.
def _hook(event, args, _root=root, _pid=str(os.getpid()), _real=os.path.realpath, _fsdecode=os.fsdecode,
          _sep=os.sep, _blocked=_BLOCKED, _path_events=_PATH_EVENTS, _frozen=_FROZEN_ATTRS, _isinstance=isinstance,
          _len=len, _deny=PermissionError, _text=(str, bytes),
          _wflags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
    if event in _blocked or event.startswith(("socket.", "ctypes.", "os.exec", "os.spawn")):
        raise _deny(f"sandbox: {event} is not allowed")
    if event == "object.__setattr__" and _len(args) > 1 and args[1] in _frozen:
        raise _deny(f"sandbox: setting {args[1]} is not allowed")
    if event == "open":
        path, mode, flags = args
        if not _isinstance(path, _text):
            return
        real = _real(_fsdecode(path))
        parts = real.split(_sep)
        if _len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != _pid:
            raise _deny(f"sandbox: another process's /proc entry is off limits: {path!r}")
        writing = (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
            (flags or 0) & _wflags)
        if writing and real != _root and not real.startswith(_root + _sep):
            raise _deny(f"sandbox: writing outside the sandbox directory is not allowed: {path!r}")
    elif event in _path_events:
        for p in args[:2]:
            if _isinstance(p, _text):
                real = _real(_fsdecode(p))
                if real != _root and not real.startswith(_root + _sep):
                    raise _deny(f"sandbox: {event} outside the sandbox directory is not allowed: {p!r}")

if audit == "1":
    sys.addaudithook(_hook)
code = compile(source, "<sandbox>", "exec")
del _hook, _BLOCKED, _PATH_EVENTS, _FROZEN_ATTRS, source, root, audit
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (e.g. -9 after a timeout, -24 SIGXCPU, -25 SIGXFSZ)
    timed_out: bool
    stdout: str  # truncated to max_output characters
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        """Exited normally with status 0 within the time limit."""
        return self.returncode == 0 and not self.timed_out


def _read(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit + 1).decode("utf-8", errors="replace")
    return data if len(data) <= limit else data[:limit] + "\n...[truncated]"


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits without reaping it (so its pid, and the process group id, cannot be reused before
    we kill the group). True if the deadline passed first."""
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.perf_counter() >= deadline:
            return True
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_code(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: int | None = None,
    memory_mb: int = 512,
    file_size_mb: int = 8,
    max_processes: int = 16,
    max_open_files: int = 64,
    max_output: int = 10_000,
    audit: bool = True,
) -> SandboxResult:
    """Run Python ``code`` in the sandbox (see the module docstring) and return its outcome.

    ``cpu_s`` defaults to ``ceil(timeout_s) + 1``, so the wall-time limit normally fires first;
    ``audit=False`` turns the audit hook off (for tests of the OS layer).
    """
    if timeout_s <= 0 or memory_mb <= 0 or file_size_mb <= 0:
        raise ValueError("run_code: timeout_s, memory_mb and file_size_mb must be positive")
    cpu = cpu_s if cpu_s is not None else int(-(-timeout_s // 1)) + 1
    workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    try:
        program = os.path.join(workdir, ".program.py")
        with open(program, "w") as f:
            f.write(code)
        env = {"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        argv = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(cpu), str(memory_mb << 20), str(file_size_mb << 20),
                str(max_processes), str(max_open_files), "1" if audit else "0", program]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
            inp.write(stdin.encode())
            inp.seek(0)
            start = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=inp, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = _wait_unreaped(proc.pid, start + timeout_s)
            duration = time.perf_counter() - start
            _kill_group(proc.pid)  # on timeout, and children left behind; the unreaped leader keeps the pgid ours
            proc.wait()
            return SandboxResult(proc.returncode, timed_out, _read(out, max_output), _read(err, max_output), duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
