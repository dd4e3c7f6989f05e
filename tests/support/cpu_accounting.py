"""CPU seconds per test, children included, for measuring the suite (docs/testing.md).

Enabled by ``EAFT_CPU_CGROUP=/sys/fs/cgroup/cpuacct/<group>`` (a cgroup-v1 ``cpuacct`` group
that pytest runs in): every process the tests start stays in that group whoever reaps it
(torchrun's workers, the zygote's ranks, fork-server children), so the group's counter read
before and after each test is that test's whole CPU time. Writes one JSON line per test phase to
``EAFT_CPU_LOG``. Off (and free) otherwise. Under pytest-xdist each worker moves itself into a
group of its own below that one (``<group>/gw0``, ...) before it starts anything, so that two
files run at a time are still measured apart; the top group's counter stays the total.
"""

from __future__ import annotations

import json
import os
import time

import pytest

_GROUP = os.environ.get("EAFT_CPU_CGROUP")
_LOG = os.environ.get("EAFT_CPU_LOG")
if _GROUP and _LOG and os.environ.get("PYTEST_XDIST_WORKER"):
    _GROUP = os.path.join(_GROUP, os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(_GROUP, exist_ok=True)
    with open(os.path.join(_GROUP, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _usage() -> float:
    with open(os.path.join(_GROUP, "cpuacct.usage")) as f:
        return int(f.read()) / 1e9


def _measured(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item, *args, **kwargs):
        if not (_GROUP and _LOG):
            yield
            return
        cpu, wall = _usage(), time.monotonic()
        yield
        with open(_LOG, "a") as log:
            log.write(json.dumps(dict(test=item.nodeid, phase=phase, cpu=round(_usage() - cpu, 2),
                                      wall=round(time.monotonic() - wall, 2))) + "\n")
    return hook


pytest_runtest_setup = _measured("setup")
pytest_runtest_call = _measured("call")
pytest_runtest_teardown = _measured("teardown")
