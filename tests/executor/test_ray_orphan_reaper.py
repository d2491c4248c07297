"""The reaper a local Ray instance's starter leaves behind: when the starter is SIGKILLed
(its shutdown never runs), whatever it had started is killed too (Ray's own reaper leaves
the raylet's agents running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pagedllm.executor.ray_reaper import orphan_reaper_command

_PARENT = (
    "import subprocess, time\n"
    "kids = [subprocess.Popen(['sleep', '120'], start_new_session=True) for _ in range(2)]\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_reaper_kills_what_a_killed_parent_left():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT])
    reaper = None
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(parent.pid).children()) < 2:
            assert time.monotonic() < deadline, "the parent did not start its children"
            time.sleep(0.1)
        kids = [c.pid for c in psutil.Process(parent.pid).children()]
        reaper = subprocess.Popen(orphan_reaper_command(parent.pid))
        time.sleep(1.5)  # a few snapshots of the parent's descendants
        assert reaper.poll() is None and all(_alive(k) for k in kids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert reaper.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(k) for k in kids)
    finally:
        for proc in (parent, reaper):
            if proc is not None and proc.poll() is None:
                proc.kill()
