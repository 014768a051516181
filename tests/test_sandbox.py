"""The code sandbox (bubblewrap): every escape class fails and leaves no trace on the host; honest code still runs.

Each test checks the host side (the file not written, the secret not printed, the signal not received, no process
left), so it fails against a sandbox that is only a subprocess with rlimits."""

import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from nanoseek.rewards.sandbox import run_code

pytestmark = pytest.mark.usefixtures("bwrap")
FAST = dict(timeout_s=2.0, memory_mb=256)


def test_honest_code_runs_with_stdin_files_and_threads():
    code = "import json, threading\nopen('a.txt', 'w').write(input())\nout = []\n" \
           "t = threading.Thread(target=lambda: out.append(open('a.txt').read()[::-1]))\nt.start()\nt.join()\n" \
           "print(json.dumps(out[0]))"
    r = run_code(code, stdin="abc\n", **FAST)
    assert r.passed and r.stdout.strip() == '"cba"' and not r.timed_out, r.stderr


def test_exit_code_and_exception_reported():
    assert run_code("import sys; sys.exit(3)", **FAST).returncode == 3
    r = run_code("raise ValueError('boom')", **FAST)
    assert not r.passed and "ValueError: boom" in r.stderr


def test_runs_as_an_unprivileged_user_with_an_empty_environment(monkeypatch):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2-7f3a")
    code = "import os\nprint(os.getuid(), os.getgid(), os.getcwd(), sorted(set(os.environ) - {'PWD'}))\n" \
           "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    r = run_code(code, **FAST)
    assert r.stdout.split("\n")[:2] == ["65534 65534 /tmp ['HOME', 'LANG', 'PATH', 'TMPDIR']",
                                       "0000000000000000"], r.stderr


# ---- resources -----------------------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_wall_timeout():
    t = time.perf_counter()
    r = run_code("while True: pass", timeout_s=1.0)
    assert r.timed_out and not r.passed and r.returncode == -9
    assert time.perf_counter() - t < 5


def test_cpu_rlimit_kills_before_the_wall_timeout():
    r = run_code("while True: pass", timeout_s=10.0, cpu_s=1)
    assert not r.timed_out and r.returncode in (-signal.SIGXCPU, -signal.SIGKILL)  # soft, then hard limit
    assert r.duration_s < 5


def test_huge_allocation_fails():
    r = run_code("x = bytearray(2 ** 31)\nprint('allocated')", timeout_s=2.0, memory_mb=256)
    assert not r.passed and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_file_size_rlimit():
    r = run_code("open('big', 'wb').write(b'x' * (3 << 20))\nprint('wrote')", **FAST, file_size_mb=1)
    assert not r.passed and "wrote" not in r.stdout and "File too large" in r.stderr  # Python ignores SIGXFSZ


def test_private_tmp_is_size_capped_and_not_kept_between_calls():
    code = "import os\nassert not os.path.exists('/tmp/kept')\nopen('/tmp/kept', 'w').write('x')\n" \
           "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\nprint('wrote all')"
    for _ in range(2):  # the second call starts from an empty /tmp
        r = run_code(code, **FAST, disk_mb=4)
        assert not r.passed and "No space left on device" in r.stderr and "wrote all" not in r.stdout, r.stderr


def test_only_the_private_tmp_is_writable():
    # an uncapped writable tmpfs (bwrap's root, /dev) would let a program fill the host's memory
    name = f"w-{secrets.token_hex(4)}"
    dirs = ["/", "/dev", "/dev/shm", "/root", "/usr", "/proc", sys.base_prefix, "/tmp"]
    code = f"import os\nfor d in {dirs!r}:\n    try:\n        open(os.path.join(d, {name!r}), 'w').write('x')\n" \
           "        print('writable', d)\n    except OSError:\n        pass"
    try:
        assert run_code(code, **FAST).stdout.split("\n") == ["writable /tmp", ""]
    finally:
        for d in dirs[:-1]:
            if os.path.lexists(os.path.join(d, name)):
                os.unlink(os.path.join(d, name))


def test_fork_bomb_is_refused():
    t = time.perf_counter()
    r = run_code("import os\nwhile True:\n    os.fork()", **FAST)
    assert not r.passed and "PermissionError" in r.stderr and time.perf_counter() - t < 5


def test_output_is_truncated():
    r = run_code("print('y' * 100000)", **FAST, max_output=1000)
    assert r.passed and len(r.stdout) < 1100 and r.stdout.endswith("[truncated]")


def test_invalid_limits_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        run_code("pass", timeout_s=0)


# ---- reading outside -----------------------------------------------------------------------------------------


@pytest.fixture
def home_secret():
    path = Path.home() / f".nanoseek-sandbox-test-{secrets.token_hex(4)}"
    path.write_text("home-secret-51c2")
    yield path
    path.unlink()


@pytest.mark.parametrize("target", ["/etc/passwd", "/etc/shadow", "home", "project", "venv"])
def test_files_outside_cannot_be_read(target, home_secret):
    path, secret = {
        "/etc/passwd": ("/etc/passwd", "root:"),
        "/etc/shadow": ("/etc/shadow", "root:"),
        "home": (str(home_secret), "home-secret-51c2"),
        "project": (str(Path(__file__).resolve()), "home_secret"),
        "venv": (os.path.join(sys.prefix, "pyvenv.cfg"), "home ="),
    }[target]
    if target == "venv" and sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtualenv")
    assert os.path.exists(path)
    r = run_code(f"print(open({path!r}).read())", **FAST)
    assert secret not in r.stdout and not r.passed and "FileNotFoundError" in r.stderr


def test_caller_environment_and_proc_are_invisible(monkeypatch):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2-7f3a")
    code = f"import os\nprint(dict(os.environ), flush=True)\nfor pid in (os.getppid(), 1, {os.getpid()}, " \
           f"{os.getppid()}):\n    try:\n        print(open(f'/proc/{{pid}}/environ', 'rb').read(), flush=True)\n" \
           "    except OSError as e:\n        print(type(e).__name__, flush=True)\n" \
           "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    r = run_code(code, **FAST)
    assert "hunter2-7f3a" not in r.stdout + r.stderr and "HOME" in r.stdout, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['1', '2']"  # only bwrap's init and the program itself


# ---- writing outside -----------------------------------------------------------------------------------------

_WRITES = {
    "open": "open(TARGET, 'w').write('pwned')",
    "dir_fd": "d = os.open(DIR, os.O_RDONLY)\nos.write(os.open(NAME, os.O_WRONLY | os.O_CREAT, dir_fd=d), b'pwned')",
    "rename": "open('x', 'w').write('pwned')\nos.rename('x', NAME, dst_dir_fd=os.open(DIR, os.O_RDONLY))",
    "link": "open('x', 'w').write('pwned')\nos.link('x', TARGET)",
    "symlink": "os.symlink('/etc/passwd', TARGET)",
    "mkfifo": "os.mkfifo(TARGET)",
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.open(TARGET.encode(), 0o101, 0o644)\n"
              "libc.write(fd, b'pwned', 5)\nassert fd >= 0, ctypes.get_errno()",
}


@pytest.mark.parametrize("where", ["test_tmp", "python_install"])  # absent in the sandbox; present but read-only
@pytest.mark.parametrize("route", list(_WRITES))
def test_writes_outside_leave_nothing_on_the_host(tmp_path, route, where):
    directory = str(tmp_path) if where == "test_tmp" else os.path.join(sys.base_prefix, "lib")
    name = f"escaped-{secrets.token_hex(4)}"
    target = os.path.join(directory, name)
    code = f"import os\nDIR, NAME, TARGET = {directory!r}, {name!r}, {target!r}\n{_WRITES[route]}\nprint('done')"
    try:
        r = run_code(code, **FAST)
        assert not r.passed and "done" not in r.stdout
        assert not os.path.lexists(target)
    finally:
        if os.path.lexists(target):
            os.unlink(target)


# ---- processes and signals -----------------------------------------------------------------------------------


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("how", ["subprocess", "fork_setsid", "daemon_after_exit", "daemon_after_timeout"])
def test_no_process_escapes_or_outlives_the_call(tmp_path, how):
    token = f"{secrets.randbelow(10**6) + 10**6}.5"  # a unique argument to `sleep`, found in the host's /proc
    marker = tmp_path / "marker"
    daemon = "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n" \
             f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 0.2; echo pwned > {marker}; exec sleep {token}'])\n" \
             "    os._exit(0)\nprint('spawned', flush=True)\n"
    code = "import os, subprocess, time\n" + {
        "subprocess": f"subprocess.Popen(['/bin/sh', '-c', 'echo pwned > {marker}; exec sleep {token}'])\n"
                      "print('spawned', flush=True)",
        "fork_setsid": daemon + "time.sleep(1)",
        "daemon_after_exit": daemon,
        "daemon_after_timeout": daemon + "time.sleep(60)",
    }[how]
    try:
        r = run_code(code, timeout_s=1.0 if how == "daemon_after_timeout" else 3.0)
        time.sleep(0.4)  # a surviving daemon would have written the marker by now
        assert "spawned" not in r.stdout and "PermissionError" in r.stderr
        assert not marker.exists() and _processes_with(token) == []
    finally:
        for pid in _processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_caller_cannot_be_signalled():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append(a))
    try:
        code = f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}):\n    try:\n" \
               "        os.kill(pid, signal.SIGUSR1)\n        print('sent', pid, flush=True)\n" \
               "    except OSError as e:\n        print(type(e).__name__, pid, flush=True)"
        r = run_code(code, **FAST)
        time.sleep(0.1)
        assert received == [] and f"ProcessLookupError {os.getpid()}" in r.stdout, r.stdout + r.stderr
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ---- network -------------------------------------------------------------------------------------------------


def test_socket_cannot_reach_a_listening_port_on_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n" \
               "print('connected')"
        r = run_code(code, **FAST)
        assert not r.passed and "connected" not in r.stdout and "ConnectionRefusedError" in r.stderr, r.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nobody ever connected
    finally:
        server.close()
