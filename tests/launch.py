"""Starting the processes of a distributed test: free ports, an environment, bounded waits."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The environment for worker processes: loopback rendezvous on a free port, one thread each."""
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        **extra,
    }


def torchrun(nproc: int, port: int) -> list[str]:
    """The ``torchrun`` command (as ``python -m torch.distributed.run``) for ``nproc`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


#: How a process that a signal killed shows: a negative return code here, or torchrun's report of
#: a rank's exit code (SIGABRT -6, SIGBUS -7, SIGSEGV -11).
_NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|7|11)\b")


def _crashed(returncode: int, log: str) -> bool:
    return returncode < 0 or (returncode != 0 and _NATIVE_CRASH.search(log) is not None)


def _start(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float) -> list[tuple[int, str]]:
    procs = [
        subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, log) for proc, log in zip(procs, logs, strict=True)]


def run_processes(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float) -> list[str]:
    """Run ``commands`` at the same time; each must exit 0 within ``timeout`` seconds. Returns the logs.

    A command that a signal killed (a native crash inside a library: glibc once aborted a gloo rank
    with "malloc(): unaligned tcache chunk detected" in CI, and 10 repeats here did not reproduce it)
    is run once more, alone, with the first crash's log tail written to stderr so it stays visible.
    A second crash, a non-zero exit or a timeout fails. ``PYTHONFAULTHANDLER`` is set so a crash
    prints the Python stack it happened under.
    """
    env = {"PYTHONFAULTHANDLER": "1", **env}
    results = _start(commands, env, timeout)
    for index, (code, log) in enumerate(results):
        if _crashed(code, log):
            name = " ".join(commands[index][-3:])
            sys.stderr.write(f"{name} crashed (exit {code}); running it again:\n{log[-4000:]}\n")
            results[index] = _start([commands[index]], env, timeout)[0]
    for command, (code, log) in zip(commands, results, strict=True):
        assert code == 0, f"{' '.join(command[-3:])} exited {code}:\n{log[-4000:]}"
    return [log for _, log in results]
