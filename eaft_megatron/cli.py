"""The ``eaft-megatron`` console command.

    eaft-megatron demo          # the whole pipeline on a small Qwen3 model, no download
    eaft-megatron info          # versions, devices and optional accelerations found
    eaft-megatron preprocess    # chat JSONL -> Megatron indexed dataset (eaft_megatron/data)
    eaft-megatron convert hf-to-megatron --hf DIR --out DIR [--tp N --pp M] [--nproc N]
    eaft-megatron convert megatron-to-hf --megatron DIR --out DIR [--dtype bf16] [--nproc N]
    eaft-megatron train --nproc-per-node N TRAINER FLAGS   # torchrun, the workers' exit status

Sub-commands are registered here and implemented in their own modules (conversion, data
preparation, training, demo), imported only when used so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


def _info(_args) -> int:
    import torch

    def version(dist_name: str) -> str:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"eaft-megatron      {version('eaft-megatron')}")
    print(f"python             {sys.version.split()[0]}")
    print(f"torch              {torch.__version__}")
    print(f"megatron-core      {version('megatron-core')}")
    print(f"transformers       {version('transformers')}")
    print(f"transformer-engine {version('transformer-engine')} (optional, GPU)")
    cuda = torch.cuda.is_available()
    print(f"device             {'cuda x%d' % torch.cuda.device_count() if cuda else 'cpu (gloo)'}")
    return 0


def _convert(args) -> int:
    """Exit codes: 0 done; 2 a mistake (one line ``eaft-megatron convert: error: ...``); 128 +
    signal when interrupted by SIGINT / SIGTERM (the temporary output is removed)."""
    from .convert import ConversionError, hf_to_megatron, megatron_to_hf
    from .convert.convert import prepare_command_line
    from .paths import Interrupted, UnsafePathError, interruptible

    prepare_command_line()
    try:
        with interruptible():
            if args.direction == "hf-to-megatron":
                out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                     force=args.force, drop_mtp=args.drop_mtp, nproc=args.nproc)
            else:
                out = megatron_to_hf(args.megatron, args.out, dtype=args.dtype,
                                     hf_config=args.hf_config, iteration=args.iteration,
                                     force=args.force, allow_non_finite=args.allow_non_finite,
                                     nproc=args.nproc)
    except (ConversionError, UnsafePathError) as e:
        print(f"eaft-megatron convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        why = e.name if isinstance(e, Interrupted) else "SIGINT"
        print(f"eaft-megatron convert: interrupted ({why}): nothing written", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    print(f"wrote {out}")
    return 0


def _add_convert(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints between HF and Megatron-Core")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    dtypes = ["bf16", "fp16", "fp32"]
    h2m = directions.add_parser("hf-to-megatron",
                                help="HF model directory -> Megatron-Core torch_dist checkpoint")
    h2m.add_argument("--hf", required=True, help="local HF model directory (safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check and pad for")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check for")
    h2m.add_argument("--dtype", choices=dtypes, default=None, help="default: the HF config's")
    h2m.add_argument("--drop-mtp", action="store_true",
                     help="GLM-4.5: do not carry the multi-token-prediction layers through "
                          "(by default they are kept in hf/extra_tensors.safetensors and "
                          "written back by megatron-to-hf)")
    h2m.add_argument("--force", action="store_true",
                     help="replace a non-empty --out (never one overlapping an input)")
    h2m.add_argument("--nproc", type=int, default=1,
                     help="local processes sharing the conversion (each reads, holds and saves "
                          "about 1/N of the parameters; one torch_dist checkpoint together); "
                          "same parameters as with 1")
    m2h = directions.add_parser("megatron-to-hf",
                                help="Megatron-Core checkpoint (converted or trained) -> HF")
    m2h.add_argument("--megatron", required=True, help="checkpoint root (or iter_XXXXXXX dir)")
    m2h.add_argument("--out", required=True, help="output HF directory")
    m2h.add_argument("--dtype", choices=dtypes, default=None,
                     help="default: the checkpoint's parameter dtype")
    m2h.add_argument("--hf-config", default=None,
                     help="HF config/tokenizer directory (default: the one stored in the "
                          "checkpoint)")
    m2h.add_argument("--iteration", type=int, default=None, help="default: the latest")
    m2h.add_argument("--force", action="store_true",
                     help="replace a non-empty --out (never one overlapping an input)")
    m2h.add_argument("--allow-non-finite", action="store_true",
                     help="convert even if some weights are NaN/Inf (refused by default)")
    m2h.add_argument("--nproc", type=int, default=1,
                     help="local processes sharing the export (whole output shards each; "
                          "each loads about 1/N of the model); same files as with 1")
    convert.set_defaults(func=_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eaft-megatron",
        description="Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('eaft-megatron')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print versions and the devices found")
    info.set_defaults(func=_info)
    _add_convert(sub)
    from .demo.pipeline import register_command as register_demo  # light: argparse only

    register_demo(sub)
    from .data.command import register_command as register_preprocess  # light: argparse only

    register_preprocess(sub)
    from .plots import add_plot_arguments, run_plot  # light: matplotlib only when drawing

    landscape = sub.add_parser(
        "landscape", help="plot the entropy-probability landscape written by the trainer's "
        "--eaft-landscape DIR (one, or two side by side)")
    add_plot_arguments(landscape)
    landscape.set_defaults(func=run_plot)
    train = sub.add_parser(  # parsed by train/launch.py (main() hands its flags over as given)
        "train", add_help=False,
        help="launch the trainer under torchrun in this process: `eaft-megatron train "
        "--nproc-per-node N TRAINER FLAGS`; a worker's one-line error and exit status (2 for "
        "a mistake) instead of torchrun's report and 1")
    train.set_defaults(func=lambda _args: _launch_train([]))
    return parser


def _launch_train(argv: list[str]) -> int:
    from .train.launch import main as launch

    return launch(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # every other flag belongs to torchrun or the trainer
        return _launch_train(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
