"""The distributed tests' launcher: a native crash is run once more, anything else fails at once."""

from __future__ import annotations

import sys

import launch
import pytest

#: Aborts (SIGABRT, as glibc does on heap corruption) the first time, exits 0 the second.
ABORT_ONCE = (
    "import os, pathlib, signal, sys; marker = pathlib.Path(sys.argv[1]);"
    "marker.exists() or (marker.touch(), os.kill(os.getpid(), signal.SIGABRT)); print('second run')"
)


def test_a_command_that_crashed_once_is_run_again(tmp_path, capsys):
    logs = launch.run_processes([[sys.executable, "-c", ABORT_ONCE, str(tmp_path / "ran")]], launch.env(), 60)
    assert "second run" in logs[0]
    assert "crashed (exit -6)" in capsys.readouterr().err


def test_a_crash_reruns_every_command_of_the_job(tmp_path):
    # Ranks of one job rendezvous with each other: a crashed rank is rerun with its peers.
    peer = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    )
    commands = [
        [sys.executable, "-c", ABORT_ONCE, str(tmp_path / "ran")],
        [sys.executable, "-c", peer, str(tmp_path / "peer")],
    ]
    launch.run_processes(commands, launch.env(), 60)
    assert (tmp_path / "peer").read_text() == "xx"


def test_a_killed_process_is_not_taken_for_a_native_crash():
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(AssertionError, match="exited -9"):
        launch.run_processes([[sys.executable, "-c", killed]], launch.env(), 60)


def test_a_second_crash_fails():
    always = "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"
    with pytest.raises(AssertionError, match="exited -6"):
        launch.run_processes([[sys.executable, "-c", always]], launch.env(), 60)


def test_an_ordinary_failure_is_not_retried(tmp_path):
    counter = tmp_path / "count"
    script = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text('x' * (p.exists() + 1)); sys.exit(3)"
    with pytest.raises(AssertionError, match="exited 3"):
        launch.run_processes([[sys.executable, "-c", script, str(counter)]], launch.env(), 60)
    assert counter.read_text() == "x"


def test_torchrun_reports_of_a_killed_rank_count_as_crashes():
    assert launch._crashed(1, "  exitcode  : -6 (pid: 4136)\n")
    assert launch._crashed(1, "exitcode: -11")
    assert not launch._crashed(1, "exitcode  : 1 (pid: 4136)")
    assert not launch._crashed(0, "exitcode  : -6")
