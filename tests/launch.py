"""Starting the processes of a distributed test: free ports, an environment, bounded waits."""

from __future__ import annotations

import os
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


def run_processes(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float) -> list[str]:
    """Run ``commands`` at the same time; each must exit 0 within ``timeout`` seconds. Returns the logs."""
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
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"{' '.join(proc.args[-3:])} exited {proc.returncode}:\n{log[-4000:]}"
    return logs
