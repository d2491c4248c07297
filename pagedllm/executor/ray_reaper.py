"""The orphan reaper: what a process that started a local Ray instance leaves behind.

A process that starts a local instance starts this reaper too. While that process lives the
reaper remembers its descendants (Ray's GCS, raylet, agents, workers); once it is gone
without shutting Ray down (SIGKILL, OOM), the reaper kills the ones left. Ray's own reaper
stops the GCS and raylet but left the raylet's DashboardAgent and RuntimeEnvAgent running.
"""

from __future__ import annotations

import os
import subprocess
import sys

_REAPER = """
import os, sys, time
import psutil
parent, me, known = int(sys.argv[1]), os.getpid(), {}
while True:
    try:
        proc = psutil.Process(parent)
        if proc.status() == psutil.STATUS_ZOMBIE:
            break
        known = {c.pid: c.create_time() for c in proc.children(recursive=True) if c.pid != me}
    except psutil.Error:
        break
    time.sleep(0.5)
for pid, created in known.items():
    try:
        child = psutil.Process(pid)
        if child.create_time() == created:
            child.kill()
    except psutil.Error:
        pass
"""
_reaper: subprocess.Popen | None = None  # this process' reaper, if it started Ray


def orphan_reaper_command(pid: int) -> list[str]:
    """The reaper process' command line, watching `pid`."""
    return [sys.executable, "-c", _REAPER, str(pid)]


def start() -> None:
    """Starts the reaper of this process (which has just started a local Ray instance)."""
    global _reaper
    _reaper = subprocess.Popen(orphan_reaper_command(os.getpid()), stdin=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip


def stop() -> None:
    """Ends the reaper: this process shut Ray down itself."""
    global _reaper
    if _reaper is not None:
        _reaper.kill()
        _reaper.wait()
        _reaper = None
