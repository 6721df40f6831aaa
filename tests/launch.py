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


#: How a native crash shows: a return code of -SIGABRT/-SIGBUS/-SIGSEGV here, or torchrun's report
#: of a rank's exit code. Other signals (the OOM killer's SIGKILL, a timeout's kill) are not retried.
_NATIVE_CRASH_CODES = (-6, -7, -11)
_NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|7|11)\b")


def _crashed(returncode: int, log: str) -> bool:
    return returncode in _NATIVE_CRASH_CODES or (returncode != 0 and _NATIVE_CRASH.search(log) is not None)


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


def _new_ports(commands: Sequence[Sequence[str]], env: dict[str, str]) -> tuple[list[list[str]], dict[str, str]]:
    """The same commands and environment on fresh rendezvous ports (``--master_port``, ``MASTER_PORT``)."""
    fresh = []
    for command in commands:
        command = list(command)
        if "--master_port" in command:
            command[command.index("--master_port") + 1] = str(free_port())
        fresh.append(command)
    return fresh, {**env, "MASTER_PORT": str(free_port())}


def run_processes(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float) -> list[str]:
    """Run ``commands`` at the same time; each must exit 0 within ``timeout`` seconds. Returns the logs.

    When one of them crashed natively (a library aborting: glibc once killed a gloo rank with
    "malloc(): unaligned tcache chunk detected" in CI, and 10 repeats here did not reproduce it),
    the whole set runs once more on fresh ports (the ranks of one job rendezvous with each other),
    with the crash's log tail written to stderr so it stays visible. A second crash, any other
    failure or a timeout fails. ``PYTHONFAULTHANDLER`` is set so a crash prints its Python stack.
    """
    env = {"PYTHONFAULTHANDLER": "1", **env}
    results = _start(commands, env, timeout)
    crashed = [i for i, (code, log) in enumerate(results) if _crashed(code, log)]
    if crashed:
        code, log = results[crashed[0]]
        name = " ".join(commands[crashed[0]][-3:])
        sys.stderr.write(f"{name} crashed (exit {code}); running all {len(commands)} again:\n{log[-4000:]}\n")
        commands, env = _new_ports(commands, env)
        results = _start(commands, env, timeout)
    for command, (code, log) in zip(commands, results, strict=True):
        assert code == 0, f"{' '.join(command[-3:])} exited {code}:\n{log[-4000:]}"
    return [log for _, log in results]
