"""eaft_megatron.paths: overlap refusal, atomic owner-named temporaries, stale cleanup, signals.

Real files, real processes: liveness is checked against processes that really exist or really
ended, signals are really delivered to a child interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from eaft_megatron.paths import (
    Interrupted,
    UnsafePathError,
    atomic_output,
    check_output,
    interruptible,
    overlaps,
    remove_stale_temps,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.bin").write_bytes(b"\x01" * 100)
    os.symlink(d, tmp_path / "link")
    return d


@pytest.mark.parametrize("out, relation", [
    ("model", "is the input"),
    ("link", "is the input"),                 # a symlink to the input
    ("model/sub", "is inside the input"),
    ("link/new", "is inside the input"),      # inside, through the symlink
    ("model/../model", "is the input"),
    (".", "contains the input"),
])
def test_overlapping_outputs_refused_even_with_force(tmp_path, src, out, relation):
    before = _tree(src)
    with pytest.raises(UnsafePathError, match=relation) as e:
        check_output(tmp_path / out, inputs={"--hf": src}, force=True)
    assert "--hf" in str(e.value)
    with pytest.raises(UnsafePathError):
        with atomic_output(tmp_path / out, inputs={"--hf": src}, force=True) as tmp:
            raise AssertionError(f"must not be reached ({tmp})")
    assert _tree(src) == before


def test_overlap_relations(tmp_path, src):
    assert overlaps(src / "sub", tmp_path / "link")
    assert not overlaps(tmp_path / "model2", src)
    assert not overlaps(tmp_path / "mod", src)  # a name prefix is not containment


def test_atomic_output_success_failure_and_replace(tmp_path, src):
    out = tmp_path / "out"
    with atomic_output(out, inputs=[src]) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and not out.exists()
        (tmp / "a").write_text("1")
    assert _tree(out) == {"a": b"1"}
    with pytest.raises(UnsafePathError, match="not empty"):
        with atomic_output(out, inputs=[src]):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(out, inputs=[src], force=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert _tree(out) == {"a": b"1"}, "a failed run must leave the old output untouched"
    with atomic_output(out, inputs=[src], force=True) as tmp:
        (tmp / "b").write_text("2")
    assert _tree(out) == {"b": b"2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model", "out"]

    f = tmp_path / "single.json"
    with atomic_output(f, directory=False) as tmp:
        assert not tmp.exists()
        tmp.write_text("x")
    assert f.read_text() == "x"
    with pytest.raises(UnsafePathError, match="exists"):
        check_output(f, directory=False)


def _start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stale_temporaries_removed_live_ones_refused(tmp_path):
    out = tmp_path / "out"
    # A process that really ran and really ended: its temporary is a leftover.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    stale = tmp_path / f".out.tmp-{_host()}-{dead}-12345-0123abcd"
    (stale / "iter_0000000").mkdir(parents=True)
    # A live process whose pid is reused: same pid, another start time -> also a leftover.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reused = tmp_path / f".out.old-{_host()}-{live.pid}-{_start_ticks(live.pid) + 7}-0123abcd"
        reused.mkdir()
        out.mkdir()  # present: the leftover .old is not needed to restore it
        other = tmp_path / f".other.tmp-{_host()}-{dead}-1-0123abcd"  # another output's
        other.mkdir()
        messages = []
        removed = remove_stale_temps(out, report=messages.append)
        assert sorted(removed) == sorted([stale, reused])
        assert not stale.exists() and not reused.exists() and other.exists()
        assert any(f"pid {dead}" in m and str(stale) in m for m in messages)

        # The same live process with its real start time: a concurrent run -> refused, kept.
        busy = tmp_path / f".out.tmp-{_host()}-{live.pid}-{_start_ticks(live.pid)}-0123abcd"
        busy.mkdir()
        with pytest.raises(UnsafePathError, match=f"another run \\(pid {live.pid}\\)"):
            with atomic_output(out):
                pass
        assert busy.exists()
    finally:
        live.kill()
        live.wait()
    # Once it is gone, the next run cleans it.
    with atomic_output(out, report=lambda m: None) as tmp:
        (tmp / "x").write_text("1")
    assert not busy.exists() and (out / "x").exists()

    foreign = tmp_path / ".out.tmp-otherhost-1-1-0123abcd"
    foreign.mkdir()
    with pytest.raises(UnsafePathError, match="host otherhost"):
        remove_stale_temps(out)


_SCRIPT = textwrap.dedent("""
    import sys, time
    from eaft_megatron.paths import Interrupted, atomic_output, interruptible
    try:
        with interruptible():
            with atomic_output(sys.argv[1]) as tmp:
                (tmp / "part").write_text("half")
                print("writing", tmp, flush=True)
                time.sleep(60)
    except Interrupted as e:
        sys.exit(e.exit_code)
""")


def _block(sig):
    return lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [sig])


@pytest.mark.parametrize("blocked", [False, True], ids=["", "blocked-at-start"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_the_temporary_with_a_message(tmp_path, sig, blocked):
    """Also when the process starts with the signal blocked (a mask inherited from its launcher):
    it would stay pending for good."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=_block(sig) if blocked else None)
    line = p.stdout.readline()
    tmp = Path(line.split()[1])
    assert tmp.is_dir() and f"-{p.pid}-" in tmp.name, "the temporary names its owner"
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # say why: the child's signal state and threads
        def sig_lines(status, also=()):
            return [ln.strip() for ln in open(status) if ln.startswith(("Sig", *also))]
        state = sig_lines(f"/proc/{p.pid}/status", ("Thr",))
        mine = sig_lines("/proc/thread-self/status")
        p.kill()
        p.communicate()
        pytest.fail(f"still running 30 s after {signal.Signals(sig).name}: child {state}, "
                    f"this thread {mine}")
    assert p.returncode == 128 + sig, err
    assert f"interrupted ({signal.Signals(sig).name}): removed the unfinished output {tmp}" in err
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_kill9_leftover_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], stdout=subprocess.PIPE,
                         text=True)
    tmp = Path(p.stdout.readline().split()[1])
    p.kill()
    p.wait()
    time.sleep(0.1)
    assert tmp.is_dir(), "SIGKILL cannot clean up: the next run must"
    messages = []
    with atomic_output(out, report=messages.append) as new:
        (new / "ok").write_text("1")
    assert not tmp.exists() and (out / "ok").exists()
    assert messages == [f"removed {tmp}, left by an interrupted run (pid {p.pid})"]


_KILLED_MID_REPLACE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from eaft_megatron.paths import atomic_output
    real = Path.rename
    def rename(self, target):
        if ".tmp-" in self.name:  # out is already moved aside: die before the new one lands
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, target)
    Path.rename = rename
    with atomic_output(sys.argv[1], force=True) as tmp:
        (tmp / "x").write_text("new")
""")


def test_kill9_between_the_two_renames_loses_neither_output(tmp_path):
    """``--force`` replaces ``out`` by two renames (out -> .old, complete .tmp -> out); a kill -9
    between them leaves no ``out``. The next run restores the killed run's complete output
    instead of deleting both leftovers."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("old")
    p = subprocess.run([sys.executable, "-c", _KILLED_MID_REPLACE, str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(q.name for q in tmp_path.iterdir())
    assert not out.exists() and len(left) == 2, left  # the state a kill -9 really leaves
    old = [q for q in sorted(tmp_path.iterdir()) if ".old-" in q.name]
    dead = old[0].name.split("-")[-3]  # the killed run's pid
    messages = []
    assert remove_stale_temps(out, report=messages.append) == old
    assert (out / "x").read_text() == "new" and sorted(tmp_path.iterdir()) == [out]
    assert "restored its complete new output" in messages[0]

    # Killed after the .tmp was removed some other way: the old output comes back.
    aside = tmp_path / f".out.old-{_host()}-{dead}-1-0123abcd"
    out.rename(aside)
    remove_stale_temps(out, report=messages.append)
    assert (out / "x").read_text() == "new" and sorted(tmp_path.iterdir()) == [out]
    assert "restored the previous output" in messages[-1]


def test_an_interruption_a_library_rewraps_is_still_an_interruption(tmp_path):
    """torch's distributed checkpointing catches what its write workers raise, our Interrupted
    included, and raises "RuntimeError: Worker failure" instead: after SIGTERM, whatever comes
    out of ``interruptible`` is the interruption (exit 128 + 15, the cleanup message)."""
    said = []
    with pytest.raises(Interrupted) as caught:
        with interruptible(), atomic_output(tmp_path / "out", report=said.append) as tmp:
            (tmp / "part").write_text("x")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                raise RuntimeError("Worker failure: an error is caught in worker 0") from None
    assert caught.value.name == "SIGTERM" and caught.value.exit_code == 143
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert said == [f"interrupted (SIGTERM): removed the unfinished output {tmp}"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="no signal"):  # without a signal: left as it is
        with interruptible():
            raise RuntimeError("no signal")
