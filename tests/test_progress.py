"""eaft_megatron.progress in real processes: plain periodic lines in logs, a tqdm bar on a tty."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

# 12 steps of 0.1 s, 2 units each, lines at most every 0.35 s
SCRIPT = """
import time
from eaft_megatron.progress import Progress
with Progress(total=24, desc="work", unit="lines", interval=0.35) as bar:
    for i in range(12):
        time.sleep(0.1)
        bar.update(2, docs=i + 1)
"""


def test_not_a_terminal_prints_periodic_plain_lines():
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    wall = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and "\x1b" not in res.stderr  # no bar, no escape codes
    periodic = [ln for ln in lines if "ETA" in ln]
    pattern = re.compile(r"^work: (\d+) lines/24 lines \((\d+\.\d)%\) \| [\d.]+ lines/s \| "
                         r"elapsed 0:00:0\d \| ETA 0:00:0\d \| docs=(\d+)$")
    # 1.2 s of work at one line per >= 0.35 s: 2 or 3 lines (fewer if the machine stalls)
    assert 1 <= len(periodic) <= 3, lines
    for ln in periodic:
        m = pattern.match(ln)
        assert m, ln
        done, pct, docs = int(m[1]), float(m[2]), int(m[3])
        assert done == 2 * docs and pct == round(100 * done / 24, 1)
    assert len(periodic) <= wall / 0.35 + 1
    assert re.fullmatch(r"work: done 24 lines in 0:00:0\d \([\d.]+ lines/s\) \| docs=12",
                        lines[-1]), lines


def test_interval_from_environment_and_unknown_total():
    script = ("import time\nfrom eaft_megatron.progress import Progress\n"
              "p = Progress(unit='B')\n"
              "for _ in range(3):\n    time.sleep(0.05)\n    p.update(3 << 20)\n"
              "p.close()\n")
    env = {**os.environ, "EAFT_PROGRESS_INTERVAL": "0"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 4, lines
    for ln, size in zip(lines, ("3.0", "6.0", "9.0")):
        assert ln.startswith(f"{size} MiB | ") and "MiB/s | elapsed 0:00:00" in ln, ln
    assert lines[-1].startswith("done 9.0 MiB in 0:00:00 ("), lines
    assert all("ETA" not in ln and "%" not in ln for ln in lines)  # no total: no ETA


def test_failure_writes_no_done_line():
    script = ("from eaft_megatron.progress import Progress\n"
              "with Progress(total=5, desc='x', interval=100) as p:\n"
              "    p.update(1)\n    raise SystemExit(3)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3 and res.stderr == ""


def test_terminal_gets_a_tqdm_bar():
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    try:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.DEVNULL,
                                stdout=secondary, stderr=secondary)
        os.close(secondary)
        out = b""
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(primary)
    text = out.decode()
    assert "\r" in text and "24/24" in text and "docs=12" in text, text
    assert "ETA" not in text and "done 24" not in text  # the plain-line format is not used
