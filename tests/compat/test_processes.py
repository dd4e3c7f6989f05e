"""compat.processes: megatron-core's checkpoint-writer processes never outlive their parent.

A real interpreter creates megatron-core's own save-time results queue (the spawned
``multiprocessing`` manager + resource tracker) and forks a child, then is killed with SIGKILL;
the test looks at what survives. Without the hygiene (the control) the manager and the tracker
do survive, re-parented; that is what makes this test able to fail.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

_SCRIPT = textwrap.dedent("""
    import os, sys, time
    if __name__ == "__main__":
        mode = sys.argv[1]
        from eaft_megatron.compat.processes import contain_child_processes
        if mode != "none":
            contain_child_processes(async_save=mode == "async")
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        q = filesystem_async.get_write_results_queue()  # what every torch_dist save calls
        q.put("result")
        assert q.get() == "result"
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        print(type(q).__name__, flush=True)
        time.sleep(120)
""")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


def _run_and_kill(mode: str, n_children: int) -> tuple[str, list[str]]:
    """(queue type, command lines of the descendants still running 10 s after SIGKILL)."""
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    try:
        queue_type = p.stdout.readline().strip()
        children = {c: " ".join(c.cmdline())[:120] for c in psutil.Process(p.pid).children(True)}
    finally:
        p.kill()
        p.wait()
    assert len(children) == n_children, children

    def running():
        alive = []
        for c in children:
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE:
                    alive.append(c)
        return alive

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = running()
    for c in survivors:  # leave nothing behind, whatever the assertions say
        with contextlib.suppress(psutil.Error):
            c.kill()
    return queue_type, [children[c] for c in survivors]


def test_without_hygiene_megatron_save_processes_are_orphaned():
    # the manager, the resource tracker, the forked child
    queue_type, survivors = _run_and_kill("none", 3)
    assert queue_type == "AutoProxy[Queue]"  # the spawned manager's queue
    text = " | ".join(survivors)
    assert "spawn_main" in text and "resource_tracker" in text, text


def test_with_async_save_children_die_with_the_parent():
    queue_type, survivors = _run_and_kill("async", 3)
    assert queue_type == "AutoProxy[Queue]"  # still a manager: async writers need one
    assert survivors == [], survivors


def test_synchronous_saves_start_no_process():
    queue_type, survivors = _run_and_kill("sync", 1)  # the forked child only
    assert queue_type == "Queue"  # in-process queue.Queue: no manager, no tracker
    assert survivors == [], survivors


def test_free_port_is_outside_the_ephemeral_range_and_skips_a_taken_one(monkeypatch):
    """Ports from bind(0) are ephemeral: any connection on the machine may take one before the
    launch binds it (another job's gloo pairs open dozens). free_port takes a port below the range,
    checked free by binding it; a taken candidate is skipped."""
    import random
    import socket

    from eaft_megatron.compat import processes

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {processes.free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports), (sorted(ports), low)
    with socket.socket() as taken, socket.socket() as check:
        taken.bind(("127.0.0.1", min(ports)))
        taken.listen()
        real_sample = random.sample
        monkeypatch.setattr(random, "sample",
                            lambda seq, k: [min(ports), *real_sample(seq, k)][:k])
        port = processes.free_port()
        assert port != min(ports) and 10000 <= port < low
        check.bind(("127.0.0.1", port))  # really free
    monkeypatch.setattr(processes, "_ephemeral_low", lambda: 0)  # range unknown: the kernel's pick
    assert processes.free_port() > 0
