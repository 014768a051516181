"""The code sandbox: escape attempts must fail safely and quickly; honest code must still run."""

import os
import socket
import subprocess
import sys
import time

import pytest

from nanoseek.rewards.sandbox import run_code

FAST = dict(timeout_s=2.0, memory_mb=256)


def _netns_available() -> bool:
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0)"
    return subprocess.run([sys.executable, "-I", "-S", "-c", probe]).returncode == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_honest_code_runs_with_stdin_and_files():
    code = "import json\nopen('a.txt', 'w').write(input())\nprint(json.dumps(open('a.txt').read()[::-1]))"
    r = run_code(code, stdin="abc\n", **FAST)
    assert r.passed and r.stdout.strip() == '"cba"' and not r.timed_out, r.stderr


def test_exit_code_and_exception_reported():
    assert run_code("import sys; sys.exit(3)", **FAST).returncode == 3
    r = run_code("raise ValueError('boom')", **FAST)
    assert not r.passed and "ValueError: boom" in r.stderr


def test_infinite_loop_is_killed_at_the_wall_timeout():
    t = time.perf_counter()
    r = run_code("while True: pass", timeout_s=1.0)
    assert r.timed_out and not r.passed and r.returncode == -9
    assert time.perf_counter() - t < 5


def test_cpu_rlimit_kills_before_the_wall_timeout():
    r = run_code("while True: pass", timeout_s=10.0, cpu_s=1)
    assert not r.timed_out and r.returncode in (-24, -9)  # SIGXCPU at the soft limit
    assert r.duration_s < 5


@pytest.mark.parametrize("audit", [True, False])
def test_huge_allocation_fails(audit):
    r = run_code("x = bytearray(2 ** 31)\nprint('allocated')", timeout_s=2.0, memory_mb=256, audit=audit)
    assert not r.passed and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_file_size_rlimit():
    r = run_code("open('big', 'wb').write(b'x' * (3 << 20))\nprint('wrote')", **FAST, file_size_mb=1)
    assert not r.passed and "wrote" not in r.stdout


def test_fork_bomb_is_contained():
    t = time.perf_counter()
    r = run_code("import os\nwhile True:\n    os.fork()", **FAST)
    assert not r.passed and time.perf_counter() - t < 5
    r = run_code("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", **FAST)
    assert not r.passed and "not allowed" in r.stderr


def test_process_group_killed_on_timeout():
    # with the audit hook off, children can be created: all must die with the group when the parent times out
    code = "import os, time\npids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n" \
           "        time.sleep(60)\n    pids.append(pid)\nprint(*pids, flush=True)\ntime.sleep(60)"
    r = run_code(code, timeout_s=1.0, audit=False)
    assert r.timed_out
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 3
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize("target", ["abs", "relative", "rename"])
def test_writes_outside_the_sandbox_dir_are_blocked(tmp_path, target):
    victim = tmp_path / "escaped.txt"
    code = {
        "abs": f"open({str(victim)!r}, 'w').write('pwned')",
        "relative": f"import os\nos.chdir('..')\nopen({str(victim)!r}, 'a').write('pwned')",
        "rename": f"open('x', 'w').write('pwned')\nimport os\nos.rename('x', {str(victim)!r})",
    }[target]
    r = run_code(code, **FAST)
    assert not r.passed and "not allowed" in r.stderr
    assert not victim.exists()


def test_low_level_open_for_write_is_blocked(tmp_path):
    victim = tmp_path / "escaped.txt"
    r = run_code(f"import os\nos.open({str(victim)!r}, os.O_WRONLY | os.O_CREAT)", **FAST)
    assert not r.passed and not victim.exists()


@pytest.mark.parametrize("audit", [True, False])
def test_socket_cannot_reach_a_listening_port(audit):
    if not audit and not _netns_available():
        pytest.skip("no network namespace here (needs CAP_SYS_ADMIN); only the audit hook blocks sockets")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n" \
               "print('connected')"
        r = run_code(code, **FAST, audit=audit)
        assert not r.passed and "connected" not in r.stdout
        with pytest.raises(TimeoutError):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_parent_env_secret_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2-7f3a")
    code = "import os\nprint(dict(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())"
    r = run_code(code, **FAST)
    assert "hunter2-7f3a" not in r.stdout + r.stderr
    assert "HOME" in r.stdout  # the first print ran: the minimal env exists, the /proc read was refused
    assert "off limits" in r.stderr


def test_hook_cannot_be_disarmed_by_patching_builtins(tmp_path):
    victim = tmp_path / "escaped.txt"
    code = f"import builtins\nbuiltins.isinstance = lambda *a: False\nbuiltins.len = lambda x: 0\n" \
           f"open({str(victim)!r}, 'w').write('pwned')"
    r = run_code(code, **FAST)
    assert not r.passed and not victim.exists()


def test_output_is_truncated():
    r = run_code("print('y' * 100000)", **FAST, max_output=1000)
    assert r.passed and len(r.stdout) < 1100 and r.stdout.endswith("[truncated]")


def test_temp_dir_is_removed_and_home_is_inside_it():
    r = run_code("import os\nprint(os.getcwd())\nprint(os.environ['HOME'])", **FAST)
    cwd, home = r.stdout.split()
    assert cwd == home and not os.path.exists(cwd)


def test_invalid_limits_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        run_code("pass", timeout_s=0)
