"""``convert hf-to-megatron / megatron-to-hf --nproc N``: N local processes, one output.

``hf-to-megatron``: every worker builds the TP=1/PP=1 model without initialising it (its
parameters are never touched unless filled, so they cost address space, not memory), takes a
contiguous run of parameters, about 1/N of the bytes (:func:`shares`, in state-dict order),
fills only those from the safetensors through the architecture's table
(``convert.fill_parameters(only=...)``: only the HF tensors they are made from are read), and
the workers save ONE torch_dist checkpoint together: ``dist_checkpointing.save`` is a
collective, each worker writing its own parameters as their main replica
(``save_model_checkpoint(names=...)``; megatron-core checks that every tensor is written
exactly once). The stored tensors and the common state are those of ``--nproc 1``; only their
spread over the ``.distcp`` files differs. The parent then writes ``hf/`` and the conversion
record as a one-process conversion does. Per worker: its share plus the largest full tensor
the table builds for it (a fused QKV, the vocabulary).

``megatron-to-hf``: the export writes the same files as one process (``max_shard_bytes``
cuts the output stream at the same tensors, :class:`~.io.ShardedSafetensorsWriter`'s rule,
and a shard's header follows from the names, dtypes and shapes alone), so its tensors are
shared out: every worker

1. builds the TP=1/PP=1 model without initialising it (its parameters are never touched, so
   they cost address space, not memory) and runs the architecture's mapping once on meta
   tensors: the HF tensors in output order, their dtypes and shapes, and the Megatron
   parameters each one is made from; hence every shard's header and each tensor's place;
2. takes a contiguous run of output tensors, about 1/N of the bytes (:func:`shares`);
3. loads from the torch_dist checkpoint only the parameters its tensors are made from
   (``load_model_weights(names=...)``; a parameter feeding tensors of two workers, e.g. a
   fused QKV, is read by both), runs the mapping again, real where it holds the parameters
   and on meta elsewhere, and writes each tensor at its place in its shard file (final name,
   opened without truncation: a shard cut between two workers is written by both; the
   worker with a shard's first tensor writes its header). Nothing is held beyond the
   parameters and the tensor being written.

The workers form one gloo world (rendezvous through a store held by the parent) for the
torch_dist load or save, collectives in megatron-core; they count the tensors done in the
store, which the parent shows as the one-process progress bar. The parent writes the index
(export) from what the workers report, then the config and tokenizer files, inside the same
:func:`~eaft_megatron.paths.atomic_output` temporary as a one-process export: the output
appears only when every worker finished. A worker that fails or dies (kill -9) stops the
others and the temporary is removed. The files are bit-identical to ``--nproc 1``.
``--nproc`` above the number of the model's parameter tensors is refused
(:func:`check_nproc`).

Processes: the converter starts one *forker* (``python -m eaft_megatron.convert.parallel TMP
PARENT``), which imports what the workers use (torch, megatron-core's model and checkpoint
code, transformers' configs, the package: :data:`_SHARED`, ~6 CPU s), runs nothing, freezes
those imports out of the garbage collector (``gc.freeze``: the workers then do not copy the
pages they share by walking them) and forks the N workers (named ``eaft-nproc-RANK`` in
``ps -o comm`` / top), so that the imports are paid once per conversion instead of once per
worker. fork is only safe in a process with one thread, and the converter itself is not one
(``import torch`` starts an OpenMP thread unless ``OMP_NUM_THREADS=1``; the store and a
progress bar start more), hence a separate forker, started with ``OMP_NUM_THREADS=1`` (each
worker then sets its own thread count). The
forker checks it holds one thread right before each fork and otherwise starts the worker as a
fresh interpreter (``... TMP RANK PARENT``), as every worker was before. A forked worker leaves
through ``os._exit`` (nothing of the forker's shutdown runs twice; its output is flushed first);
the forker records each worker's exit status (``-signal`` if killed) in ``TMP`` for the
converter, which reads a failure from there, and SIGTERMs the forker to stop the rest (it kills
and reaps them). Each process dies with the one that started it
(``compat.processes.die_with_parent``: converter -> forker -> workers), and Ctrl-C is the
converter's alone (the others ignore SIGINT).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .io import SAFETENSORS_INDEX, ConversionError

_SPEC = ".nproc-spec.json"
_MODULE = "eaft_megatron.convert.parallel"  # (its __name__ is __main__ in the forker)


def _result(tmp: Path, rank: int, kind: str) -> Path:
    return tmp / f".nproc-rank{rank}.{kind}"


def check_nproc(nproc, tensors: int | None = None) -> None:
    """``nproc`` is a positive number of processes, and (given the model's number of parameter
    tensors) not more than there is work for; else ConversionError saying which."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConversionError(f"--nproc must be a positive number of processes, got {nproc}")
    if tensors is not None and nproc > tensors:
        raise ConversionError(f"--nproc {nproc} is more processes than the model has parameter "
                              f"tensors to share ({tensors})")


def run_workers(tmp: Path, nproc: int, spec: dict, *, progress=None) -> None:
    """Convert with ``nproc`` worker processes into ``tmp`` (``spec["direction"]``); for an
    export, write the index. ``progress``: a :class:`~eaft_megatron.progress.Progress` advanced
    by the tensors the workers report. Raises ConversionError (the first failing worker's
    one-line message) if any worker fails."""
    import torch.distributed as dist

    # The workers' rendezvous, held by this process (no port to race for).
    store = dist.TCPStore("127.0.0.1", 0, world_size=nproc + 1, is_master=True,
                          wait_for_workers=False)
    (tmp / _SPEC).write_text(json.dumps({**spec, "nproc": nproc, "port": store.port}))
    # The forker (see the module doc): OpenMP starts no thread at import with one thread asked.
    forker = subprocess.Popen([sys.executable, "-m", _MODULE, str(tmp), str(os.getpid())],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        shown = 0
        while True:
            gone = forker.poll() is not None  # (it records every exit status before it exits)
            codes = [_exit_status(tmp, rank) for rank in range(nproc)]
            if progress is not None and (done := store.add(_PROGRESS, 0)) > shown:
                progress.update(done - shown)
                shown = done
            if None not in codes or any(c not in (None, 0) for c in codes):
                break  # (every one: a failure ends the wait at once)
            if gone:
                raise ConversionError(f"--nproc {nproc}: the workers' parent process exited "
                                      f"with status {forker.returncode}; nothing written")
            time.sleep(0.05)
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                error = _result(tmp, rank, "error")
                if error.is_file():
                    raise ConversionError(error.read_text().strip())
                how = (f"was killed by signal {-code}" if code < 0
                       else f"exited with status {code}")
                raise ConversionError(f"--nproc {nproc}: worker {rank} {how}; nothing written")
        if progress is not None:  # (the last counts, reported after the last poll)
            progress.update(store.add(_PROGRESS, 0) - shown)
    finally:
        if forker.poll() is None:
            forker.terminate()  # it kills and reaps the workers still running
        forker.wait()
    (tmp / _SPEC).unlink()
    for rank in range(nproc):
        _result(tmp, rank, "exit").unlink()
    if spec["direction"] != "megatron-to-hf":
        return
    weight_map, total = {}, 0
    for rank in range(nproc):
        done = json.loads(_result(tmp, rank, "json").read_text())
        weight_map.update(done["weight_map"])
        total += done["bytes"]
        _result(tmp, rank, "json").unlink()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _exit_status(tmp: Path, rank: int) -> int | None:
    """Worker ``rank``'s exit status as the forker recorded it (``-signal`` if killed), or
    None while it runs."""
    path = _result(tmp, rank, "exit")
    return int(path.read_text()) if path.is_file() else None


def shares(sizes: list[int], nproc: int) -> list[int]:
    """The worker of each item (an output tensor, a parameter): contiguous runs, each about
    1/nproc of the bytes (an item goes to the worker whose share holds its middle byte), and
    every worker has at least one item when there are nproc or more."""
    total, start, owners, previous = max(sum(sizes), 1), 0, [], -1
    for i, size in enumerate(sizes):
        owner = min(nproc - 1, (2 * start + size) * nproc // (2 * total))
        # enough items left for the workers after this one; no worker skipped
        owner = min(max(owner, previous, nproc - (len(sizes) - i)), previous + 1)
        owners.append(owner)
        previous, start = owner, start + size
    return owners


def _plan(arch, config, params: dict, out_dtype, extra: Path | None, max_shard_bytes: int):
    """The export on meta tensors: [(hf name, nbytes, Megatron names it is made from, mapping
    step, dtype, shape)] in output order, the shard index of each, the step of each take."""
    from .. import models
    from .convert import KEEP_FP32_HF, mapped
    from .io import ST_DTYPES

    taken: list[str] = []
    groups: list[int] = []  # the group (run of takes and the outputs after it) of each take

    def take(name: str) -> torch.Tensor:
        if name not in params:
            raise ConversionError(f"mapping asked for {name!r}, which the model does not have")
        taken.append(name)
        groups.append(group + 1)  # (the group number changes at its first output)
        return torch.empty_like(params[name], device="meta")

    outputs, deps, group = [], frozenset(), -1
    for name, t in mapped(models.megatron_to_hf(arch, config, take, te=False)):
        if taken:  # the outputs after a run of takes are made from those parameters
            deps, taken, group = frozenset(taken), [], group + 1
        keep = name.endswith(KEEP_FP32_HF) and t.dtype == torch.float32
        dtype = torch.float32 if keep else out_dtype
        outputs.append((name, t.numel() * dtype.itemsize, deps, group, dtype, list(t.shape)))
    used = set().union(*(o[2] for o in outputs))
    if unused := sorted(set(params) - used):
        raise ConversionError(f"Megatron parameters not consumed by the {arch.hf_architecture} "
                              f"mapping: {unused[:8]}")
    if extra is not None:
        from safetensors import safe_open

        with safe_open(str(extra), "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                dtype, numel = ST_DTYPES[s.get_dtype()], 1
                for d in s.get_shape():
                    numel *= d
                outputs.append((name, numel * dtype.itemsize, frozenset(), -1, dtype,
                                list(s.get_shape())))
    shard, pending, of = 0, 0, []  # ShardedSafetensorsWriter.add's rule
    for _, nbytes, *_ in outputs:
        if pending and pending + nbytes > max_shard_bytes:
            shard, pending = shard + 1, 0
        pending += nbytes
        of.append(shard)
    return outputs, of, groups


class _StoreProgress:
    """A worker's side of the progress bar: tensors done, counted in the parent's store."""

    def __init__(self, store) -> None:
        self.store = store

    def update(self, n: int = 1) -> None:
        self.store.add(_PROGRESS, n)


_PROGRESS = "progress"


def _worker(tmp: Path, rank: int) -> None:
    import torch.distributed as dist

    spec = json.loads((tmp / _SPEC).read_text())
    nproc = spec["nproc"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    # One gloo world of the workers: torch_dist loads and saves are collective (and
    # megatron-core can only load part of a layer-stacked tensor in a world of two or more).
    store = dist.TCPStore("127.0.0.1", spec["port"], world_size=nproc + 1, is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("nproc", store), rank=rank,
                            world_size=nproc)
    if spec["direction"] == "hf-to-megatron":
        _import_share(tmp, rank, spec, _StoreProgress(store))
    else:
        _export_share(tmp, rank, spec, _StoreProgress(store))


def _import_share(tmp: Path, rank: int, spec: dict, bar: _StoreProgress) -> None:
    """hf-to-megatron: fill this worker's parameters, save them with the others' (collective)."""
    import torch.distributed as dist

    from .. import models
    from ..checkpoint import megatron_process_group, save_model_checkpoint
    from .convert import (
        build_model,
        checkpoint_args,
        fill_parameters,
        load_hf_config,
        model_parameters,
        pass_through,
    )
    from .io import SafetensorsReader

    nproc, hf_dir = spec["nproc"], Path(spec["hf_dir"])
    config = load_hf_config(hf_dir)
    arch = models.get_arch(config)
    reader = SafetensorsReader(hf_dir)
    direct = pass_through(arch, config, reader)
    with megatron_process_group():
        model = build_model(config, padded_vocab=spec["padded_vocab"],
                            dtype=getattr(torch, spec["dtype"]))
        params = {k: v.detach() for k, v in model_parameters(model).items()}
        owner = shares([v.numel() * v.element_size() for v in params.values()], nproc)
        mine = {name for name, o in zip(params, owner) if o == rank}
        fill_parameters(params, arch, config, reader, direct, only=mine, bar=bar)
        del params
        if rank == 0:  # the modules' extra states (no tensors): written once, by worker 0
            mine |= {k for k in model.state_dict(keep_vars=True) if k.endswith("_extra_state")}
        save_model_checkpoint([model], tmp, iteration=0, consume=True, names=mine,
                              args=checkpoint_args(model.config, config, tp=spec["tp"],
                                                   pp=spec["pp"],
                                                   padded_vocab=spec["padded_vocab"]))
        del model
    dist.destroy_process_group()


def _export_share(tmp: Path, rank: int, spec: dict, bar: _StoreProgress) -> None:
    """megatron-to-hf: load the parameters of this worker's shards, write the shards."""
    import torch.distributed as dist

    from .. import models
    from ..checkpoint import load_model_weights, megatron_process_group
    from .convert import (
        KEEP_FP32_HF,
        build_model,
        load_hf_config,
        mapped,
        model_parameters,
        non_finite_tensors,
    )
    from .io import safetensors_header, shard_file_name, write_at

    nproc, iter_dir = spec["nproc"], Path(spec["iter_dir"])
    out_dtype, ckpt_dtype = getattr(torch, spec["out_dtype"]), getattr(torch, spec["ckpt_dtype"])
    extra = Path(spec["extra"]) if spec["extra"] else None
    config = load_hf_config(spec["hf_side"])
    arch = models.get_arch(config)
    with megatron_process_group():
        model = build_model(config, padded_vocab=spec["padded_vocab"], dtype=ckpt_dtype)
        params = {k: v.detach() for k, v in model_parameters(model).items()}
        expected = set(models.megatron_names(arch, config, te=False))
        unknown, absent = sorted(set(params) - expected), sorted(expected - set(params))
        if unknown or absent:
            raise ConversionError(f"the {arch.hf_architecture} mapping does not match the "
                                  f"model: not consumed {unknown[:8]}, missing {absent[:8]}")
        outputs, shard_of, take_groups = _plan(arch, config, params, out_dtype, extra,
                                  spec["max_shard_bytes"])
        count = shard_of[-1] + 1 if shard_of else 1
        owner = shares([o[1] for o in outputs], nproc)
        mine = {o[0] for o, w in zip(outputs, owner) if w == rank}
        needed = set().union(*(o[2] for o in outputs if o[0] in mine))
        # the mapping's steps with an output of this worker's: real there, meta elsewhere
        real = {o[3] for o in outputs if o[0] in mine}
        # A collective: every worker loads, at least the smallest tensor.
        needed.add(min(params.items(), key=lambda kv: (kv[1].numel(), kv[0]))[0])
        load_model_weights([model], iter_dir, names=needed)
        tensors = {k: params[k] for k in needed}
        metas = {k: torch.empty_like(v, device="meta") for k, v in params.items()}
        del model, params
    dist.destroy_process_group()  # nothing more is exchanged
    if not spec["allow_non_finite"] and (bad := non_finite_tensors(tensors)):
        more = " ..." if len(bad) > 5 else ""
        raise ConversionError(f"{iter_dir} has non-finite values (NaN/Inf) in {len(bad)} "
                              f"tensor(s) (worker {rank}'s share): {', '.join(bad[:5])}{more}; "
                              f"nothing written (--allow-non-finite converts it anyway)")

    calls = iter(take_groups)

    def take(name: str) -> torch.Tensor:  # this worker's parameters once, meta otherwise
        if next(calls, None) in real and name in tensors:
            return tensors.pop(name)
        if name not in metas:
            raise ConversionError(f"mapping asked for {name!r}, which the model does not have")
        return metas[name]

    # Where each tensor goes: the shard files' headers and offsets, known to every worker.
    where: dict[str, tuple[int, int]] = {}  # name -> (shard, byte position in its file)
    headers: dict[int, bytes] = {}
    for shard in range(count):
        entries = [o for o, s in zip(outputs, shard_of) if s == shard]
        headers[shard], positions = safetensors_header([(o[0], o[4], o[5]) for o in entries],
                                                       {"format": "pt"})
        where.update({o[0]: (shard, pos) for o, pos in zip(entries, positions)})
    files: dict[int, int] = {}
    weight_map, total = {}, 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal total
        shard, position = where[name]
        if tensor.device.type == "meta":
            raise ConversionError(f"--nproc: {name} depends on parameters the mapping took "
                                  f"before the ones it was attributed to; use --nproc 1")
        if shard not in files:  # (several workers write into one file: never truncated)
            files[shard] = os.open(tmp / shard_file_name(shard, count),
                                   os.O_WRONLY | os.O_CREAT, 0o666)
            if next(o[0] for o, s in zip(outputs, shard_of) if s == shard) in mine:
                write_at(files[shard], headers[shard], 0)
        write_at(files[shard], tensor.detach().cpu().contiguous(), position)
        total += tensor.numel() * tensor.element_size()
        weight_map[name] = shard_file_name(shard, count)

    try:
        for name, tensor in mapped(models.megatron_to_hf(arch, config, take, te=False)):
            if name in mine:
                keep = name.endswith(KEEP_FP32_HF) and tensor.dtype == torch.float32
                add(name, tensor if keep else tensor.to(out_dtype))
                bar.update(1)
            del tensor
        if extra is not None:
            from safetensors import safe_open

            with safe_open(str(extra), "pt") as f:
                for name in f.keys():
                    if name in mine:
                        add(name, f.get_tensor(name))
    finally:
        for fd in files.values():
            os.close(fd)
    if set(weight_map) != mine:
        raise ConversionError(f"--nproc: worker {rank} did not get all of its tensors")
    _result(tmp, rank, "json").write_text(json.dumps({"weight_map": weight_map, "bytes": total}))


# What the forker imports for the workers (measured: without it, the modules a worker imported
# after its fork were transformers, megatron-core's GPT model and checkpoint strategies,
# megatron.training and the package's model and CPU modules; now only the architecture's few).
_SHARED = ("torch.distributed", "transformers.models.auto.configuration_auto",
           "megatron.core.models.gpt", "megatron.core.dist_checkpointing.strategies.fully_parallel",
           "megatron.core.dist_checkpointing.strategies.filesystem_async", "megatron.training",
           "eaft_megatron.compat.cpu", "eaft_megatron.compat.deltanet",
           "eaft_megatron.models.model", "eaft_megatron.checkpoint",
           "eaft_megatron.convert.convert")


def _start(argv: list[str]) -> int:
    """Start ``main(argv)`` in a child process; its pid. Forked from this one (its imports
    shared) when this process holds a single thread, as fork needs; else a fresh interpreter."""
    from ..compat.processes import thread_count

    if thread_count() != 1:  # (0: not Linux, not known: no fork)
        return os.posix_spawn(sys.executable, [sys.executable, "-m", _MODULE, *argv],
                              os.environ)
    sys.stdout.flush()
    sys.stderr.flush()  # (else the child writes this process's buffered output again)
    pid = os.fork()
    if pid == 0:  # never returns into the caller's frames or runs its exit handlers
        code = 1
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _serve(tmp: Path) -> int:
    """The forker: import what the workers use, start them, record each one's exit status in
    ``tmp`` until all are done. SIGTERM (from the converter): kill and reap the workers."""
    import importlib

    for name in _SHARED:
        with contextlib.suppress(ImportError):  # (a worker would import it, or fail, itself)
            importlib.import_module(name)
    # The imports outlive every worker: out of the garbage collector's sight, so that the
    # workers' collections and exit do not walk them and copy the pages fork shared.
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    workers: dict[int, int] = {}  # pid -> rank
    try:
        for rank in range(json.loads((tmp / _SPEC).read_text())["nproc"]):
            workers[_start([str(tmp), str(rank), str(os.getpid())])] = rank
        while workers:
            pid, status = os.waitpid(-1, 0)
            if (rank := workers.pop(pid, None)) is not None:
                part = _result(tmp, rank, "exit.part")
                part.write_text(str(os.waitstatus_to_exitcode(status)))
                part.replace(_result(tmp, rank, "exit"))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (not while exiting)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for pid in workers:
            os.waitpid(pid, 0)
    return 0


def _work(tmp: Path, rank: int) -> int:
    """A worker: its share of the conversion; a ConversionError's one line in its error file."""
    from ..checkpoint import CheckpointError

    with contextlib.suppress(OSError):  # its name in ps -o comm, top, psutil's name()
        Path("/proc/self/comm").write_text(f"eaft-nproc-{rank}")
    try:
        _worker(tmp, rank)
    except (ConversionError, CheckpointError) as e:
        _result(tmp, rank, "error").write_text(" ".join(str(e).split()) + "\n")
        return 2
    return 0


def main(argv: list[str]) -> int:
    """``TMP PARENT``: the forker; ``TMP RANK PARENT``: a worker (PARENT: the process that
    started it, with which it dies)."""
    from ..compat.processes import die_with_parent
    from .convert import prepare_command_line

    # Ctrl-C reaches the whole process group: the parent stops the workers and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (a forked worker: not the forker's)
    die_with_parent(int(argv[-1]))
    prepare_command_line()
    if len(argv) == 2:
        return _serve(Path(argv[0]))
    try:
        return _work(Path(argv[0]), int(argv[1]))
    except BaseException:  # (a forked worker leaves through os._exit: say why here)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
