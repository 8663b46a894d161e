"""`accelerate launch` of several gloo CPU processes, for the tests that compare them with one process."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    # accelerate's default port 29500 would collide with any other launch on this machine (parallel CI jobs).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(n: int, *args: str) -> list[str]:
    """The command that runs `python ARGS` on n processes. Not `--cpu`: accelerate 1.15 then starts ONE process
    (several CPU processes only through mpirun). The torchrun launcher behind --multi_gpu starts n, and
    ACCELERATE_USE_CPU (`cpu_env`) makes them gloo CPU ranks."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--main_process_port", str(free_port()), *args]


def cpu_env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
