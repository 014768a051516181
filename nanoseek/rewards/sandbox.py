"""Run untrusted code (model completions) in a bubblewrap sandbox (``bwrap``, Debian package ``bubblewrap``).

Isolation, all from the kernel, none from Python:
- namespaces: new user, PID, mount, network (only its own loopback), IPC, UTS and cgroup; uid 65534 with no
  capabilities and no further user namespaces (``--disable-userns``);
- files: a new root with only read-only binds of the interpreter's install and the system libraries, a fresh
  ``/proc``, a minimal ``/dev`` and a private size-capped tmpfs ``/tmp`` (cwd and HOME); no ``/etc``, home or venv;
- processes: a seccomp filter refuses fork, vfork and clone without CLONE_THREAD (RLIMIT_NPROC does not bind a root
  caller); ``--new-session``; ``--die-with-parent`` and the PID namespace end every process at the timeout;
- rlimits (set by a bootstrap before the program runs): CPU seconds, address space, file size (which also caps
  stdout/stderr, written to files), processes/threads, open files, no core dumps; an empty environment.

Without a working bubblewrap, ``run_code`` and ``get_reward_fn("code")`` raise ``SandboxUnavailable``; there is
no weaker fallback."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

INSTALL_HINT = "install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"
_UID = 65534  # "nobody" inside the user namespace
_INTERPRETER = os.path.realpath(sys.executable)  # a virtualenv's python links to the base install's; the venv stays out

# Runs inside the sandbox with ``python -I -S -c``; argv: limits, then the fd holding the program (closed once read).
_BOOTSTRAP = r"""
import os, sys, resource
cpu_s, mem, fsize, nproc, nofile, fd = map(int, sys.argv[1:])
for lim, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                 (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
with open(fd, encoding="utf-8") as f:
    code = compile(f.read(), "<sandbox>", "exec")
del os, sys, resource, cpu_s, mem, fsize, nproc, nofile, fd, f, lim, val
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


class SandboxUnavailable(ValueError):
    """bubblewrap is missing or cannot create namespaces here (a set-up error: the CLI prints it, no traceback)."""


@dataclass(frozen=True)
class Limits:
    """Limits of one run: ``cpu_s`` defaults to ``ceil(timeout_s) + 1`` (the wall-time limit fires first);
    ``disk_mb`` caps the private /tmp; ``max_processes`` bounds threads; ``max_output`` truncates stdout/stderr."""

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 512
    file_size_mb: int = 8
    disk_mb: int = 64
    max_processes: int = 16
    max_open_files: int = 64
    max_output: int = 10_000


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (e.g. -9 after a timeout, -24 SIGXCPU)
    timed_out: bool
    stdout: str  # truncated to max_output characters
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:  # exited normally with status 0 within the time limit
        return self.returncode == 0 and not self.timed_out


def _seccomp_no_new_processes() -> bytes:
    """Classic-BPF seccomp program (``struct sock_filter[]``): fork/vfork and clone without CLONE_THREAD → EPERM,
    clone3 → ENOSYS (its flags are behind a pointer; libc then uses clone), other ABIs → kill, the rest allowed."""
    machine = platform.machine()
    if machine == "x86_64":  # AUDIT_ARCH_X86_64; syscalls >= 0x40000000 are the x32 ABI
        arch, clone, denied, abi_bit = 0xC000003E, 56, (57, 58), 0x40000000
    elif machine == "aarch64":  # AUDIT_ARCH_AARCH64 has no fork/vfork syscalls
        arch, clone, denied, abi_bit = 0xC00000B7, 220, (), None
    else:
        raise SandboxUnavailable(f"the code sandbox's seccomp filter supports x86_64 and aarch64, not {machine}")
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
    eperm, enosys, clone_thread = 1, 38, 0x00010000
    # (code, jump-if-true label, jump-if-false label, k); labels are resolved to relative offsets below
    prog = [(ld, None, None, 4), (jeq, None, "kill", arch), (ld, None, None, 0)]
    if abi_bit is not None:
        prog.append((jge, "kill", None, abi_bit))
    prog.append((jeq, "enosys", None, 435))  # clone3
    prog += [(jeq, "eperm", None, nr) for nr in denied]
    prog += [(jeq, None, "allow", clone), (ld, None, None, 16), (jset, "allow", "eperm", clone_thread)]
    tail = {"allow": allow, "eperm": errno | eperm, "enosys": errno | enosys, "kill": kill}
    at = {name: len(prog) + i for i, name in enumerate(tail)}
    out = b"".join(struct.pack("=HBBI", code, at[t] - i - 1 if t else 0, at[f] - i - 1 if f else 0, k)
                   for i, (code, t, f, k) in enumerate(prog))
    return out + b"".join(struct.pack("=HBBI", ret, 0, 0, k) for k in tail.values())


def _binds() -> list[str]:
    """bwrap arguments for the new root: the interpreter's install and the system libraries, read-only."""
    args: list[str] = []
    for path in ("/usr", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    bound = ["/usr"]
    for path in sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                                       os.path.dirname(_INTERPRETER))}):
        if not any(path == b or path.startswith(b + "/") for b in bound):  # sorted: a parent comes first
            args += ["--ro-bind", path, path]
            bound.append(path)
    return args


@functools.cache
def require_bwrap() -> str:
    """The path of a working ``bwrap``; else ``SandboxUnavailable`` saying how to get one (checked once)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"the code reward runs model-written programs in bubblewrap, which is not "
                                 f"installed (no `bwrap` on PATH); {INSTALL_HINT}")
    probe = _run(bwrap, "print('ok')", "", Limits(timeout_s=10.0, cpu_s=10, memory_mb=256, file_size_mb=1, disk_mb=1,
                                                max_output=1000))
    if not probe.passed or probe.stdout != "ok\n":
        raise SandboxUnavailable(f"bubblewrap ({bwrap}) cannot create the code sandbox here: "
                                 f"{probe.stderr.strip() or probe} (it needs bubblewrap >= 0.8 and unprivileged "
                                 "user namespaces: sysctl kernel.unprivileged_userns_clone=1; in Docker, "
                                 "--security-opt seccomp=unconfined)")
    return bwrap


def run_code(code: str, *, stdin: str = "", **limits) -> SandboxResult:
    """Run Python ``code`` in the sandbox (see the module docstring) under ``Limits(**limits)``; its outcome."""
    lim = Limits(**limits)
    if lim.timeout_s <= 0 or lim.memory_mb <= 0 or lim.file_size_mb <= 0 or lim.disk_mb <= 0:
        raise ValueError("run_code: timeout_s, memory_mb, file_size_mb and disk_mb must be positive")
    return _run(require_bwrap(), code, stdin, lim)


def _run(bwrap: str, code: str, stdin: str, lim: Limits) -> SandboxResult:
    with (tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp,
          tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as seccomp):
        for f, data in ((inp, stdin.encode()), (program, code.encode()), (seccomp, _seccomp_no_new_processes())):
            f.write(data)
            f.seek(0)
        cpu_s = lim.cpu_s if lim.cpu_s is not None else int(-(-lim.timeout_s // 1)) + 1
        limits = (cpu_s, lim.memory_mb << 20, lim.file_size_mb << 20, lim.max_processes, lim.max_open_files,
                  program.fileno())
        argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(_UID), "--gid", str(_UID),
                "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv", *_binds(),
                "--proc", "/proc", "--dev", "/dev", "--size", str(lim.disk_mb << 20), "--tmpfs", "/tmp",
                "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--remount-ro", "/dev",
                "--remount-ro", "/", "--seccomp", str(seccomp.fileno()),
                "--", _INTERPRETER, "-I", "-S", "-c", _BOOTSTRAP, *map(str, limits)]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, env={}, cwd="/",
                                pass_fds=(program.fileno(), seccomp.fileno()))
        try:
            proc.wait(lim.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()  # --die-with-parent and the PID namespace take every sandboxed process with it
            proc.wait()
            timed_out = True
        duration = time.perf_counter() - start
        rc = proc.returncode
        if 128 < rc < 128 + 65:  # bwrap reports a child killed by signal N as exit status 128 + N
            rc = 128 - rc
        texts = [os.pread(f.fileno(), lim.max_output + 1, 0).decode("utf-8", errors="replace") for f in (out, err)]
        texts = [t if len(t) <= lim.max_output else t[:lim.max_output] + "\n...[truncated]" for t in texts]
        return SandboxResult(rc, timed_out, *texts, duration)
