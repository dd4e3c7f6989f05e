"""``python -m tests.support.zygote_run TORCHRUN-ARGS...``: a torchrun launch served by the
session's zygote, for the torchrun launches the package starts itself.

The demo (and the GPU acceptance benchmark's train stage) launches its trainer with
``$EAFT_TORCHRUN`` when set (a site's wrapper around torchrun, see docs/demo.md); the tests set
it to this module, with ``$EAFT_ZYGOTE_SOCKET`` naming the session's zygote
(``launch.zygote_env()``). This client parses torchrun's options
(``--nproc-per-node N``, ``--master-addr``, ``--master-port``, ``--nnodes 1``,
``--node-rank 0``, ``--standalone``; ``--opt=value`` and ``--opt_name`` spellings too) and ``-m
MODULE ARGS``, and asks the zygote to run the launch exactly as ``launch.run_module`` does: N
ranks forked from the pre-imported process, torchrun's worker environment, a real gloo group, the
real entry point. The ranks write to this client's own stdout and stderr (they open
``/proc/<this pid>/fd/1`` and ``fd/2`` while it waits) and get its environment and working
directory. SIGTERM and SIGINT are forwarded to the launch's process group; the client exits with
the launch's status (a rank killed by a signal: the client dies of the same signal). If the
client itself dies (kill -9, a timeout), the zygote's launcher kills the ranks.

Anything else (a script instead of ``-m``, other torchrun options) runs real torchrun
(``python -m torch.distributed.run`` with the same arguments).

Imports nothing heavy (no torch): it only talks to the zygote's socket
(:func:`tests.support.zygote.request`).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from tests.support import zygote

SOCKET_VARIABLE = "EAFT_ZYGOTE_SOCKET"
_VALUED = {"--nproc-per-node": "nproc", "--master-addr": "addr", "--master-port": "port",
           "--nnodes": "nnodes", "--node-rank": "node_rank"}


def parse(argv: list[str]) -> dict | None:
    """torchrun's command line -> ``dict(nproc, addr, port, module, args)``; None when the
    zygote cannot stand in for it (then real torchrun runs it)."""
    opts = dict(nproc="1", addr="127.0.0.1", port="29500", nnodes="1", node_rank="0")
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        name = name.replace("_", "-") if name.startswith("--") else name
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i, value = i + 1, argv[i + 1]
            opts[_VALUED[name]] = value
        elif arg == "--standalone":
            pass  # one node, a port of its own: what every launch here is
        elif arg in ("-m", "--module") and i + 1 < len(argv):
            module, args = argv[i + 1], argv[i + 2:]
            break
        else:
            return None  # a script, or an option this client does not know
        i += 1
    else:
        return None
    if not (opts["nproc"].isdigit() and int(opts["nproc"]) > 0 and opts["port"].isdigit()
            and opts["nnodes"] in ("1", "1:1") and opts["node_rank"] == "0"):
        return None
    return dict(nproc=int(opts["nproc"]), addr=opts["addr"], port=int(opts["port"]),
                module=module, args=list(args))


def run(launch: dict, path: str) -> int:
    """Ask the zygote at ``path`` to run ``launch``; wait, forwarding SIGTERM/SIGINT to the
    launch's process group; its status (negative: the signal that killed a rank)."""
    me = os.getpid()
    env = dict(os.environ)
    if launch["nproc"] > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for several workers
    launch_request = dict(module=launch["module"], args=launch["args"], nproc=launch["nproc"],
                          env=env, cwd=os.getcwd(), stdout=f"/proc/{me}/fd/1",
                          stderr=f"/proc/{me}/fd/2", addr=launch["addr"], port=launch["port"],
                          distributed=True)
    group: list[int] = []  # the launch's process group, once the zygote said it
    pending: list[int] = []

    def forward(signum, frame):
        if group:
            try:
                os.killpg(group[0], signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _, stream, pid = zygote.request(path, launch_request)
    group.append(pid)
    for signum in pending:
        forward(signum, None)
    answer = stream.readline()
    if not answer:
        print(f"zygote_run: the zygote's launcher {group[0]} died without an answer",
              file=sys.stderr, flush=True)
        return 1
    return int(json.loads(answer)["returncode"])


def main(argv: list[str]) -> int:
    launch = parse(argv)
    if launch is None:
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *argv])
    path = os.environ.get(SOCKET_VARIABLE)
    if not path:
        print(f"zygote_run: {SOCKET_VARIABLE} is not set (the zygote's socket)", file=sys.stderr)
        return 2
    code = run(launch, path)
    if code < 0:  # as the rank ended: by that signal
        sys.stdout.flush()
        if -code in (signal.SIGINT, signal.SIGTERM):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
