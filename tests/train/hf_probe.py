"""The trainer with a probe on its model provider, for tests that need the parameters a real
launch starts from (``tests/train/test_hf_start.py``).

    torchrun --nproc-per-node 4 -m tests.train.hf_probe <trainer flags>

Runs ``eaft_megatron.train`` unchanged, except that ``steps.model_provider`` is wrapped: after a
chunk is built (and, with a Hugging Face directory as the start, filled from it by the
trainer's own code), a twin chunk of the same config and layout is built and filled by
``load_model_weights`` from the torch_dist checkpoint ``$EAFT_PROBE_CONVERTED`` (an
``eaft-megatron convert hf-to-megatron`` of the same HF directory: megatron-core's own sharded
loading is the oracle). Each rank writes ``$EAFT_PROBE_OUT/rank<r>.json``: its state-dict
entries, how many there are, and those that differ (dtype or any bit) from the twin's. The
twin's load is a collective: every rank builds one chunk (no virtual pipeline stages).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _probed(original):
    def provider(hf_config, pre_process=True, post_process=True, vp_stage=None, config=None,
                 pg_collection=None, *, hf_weights=None):
        import torch
        import torch.distributed as dist
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        from eaft_megatron.checkpoint import find_iteration_dir, load_model_weights
        from eaft_megatron.models import build_gpt_model

        model = original(hf_config, pre_process, post_process, vp_stage, config, pg_collection,
                         hf_weights=hf_weights)
        args = get_args()
        twin = build_gpt_model(hf_config, pre_process=pre_process, post_process=post_process,
                               config=config or core_transformer_config_from_args(args),
                               vp_stage=vp_stage, pg_collection=pg_collection,
                               padded_vocab=args.padded_vocab_size)
        load_model_weights([twin], find_iteration_dir(os.environ["EAFT_PROBE_CONVERTED"]))
        mine, theirs = (dict(m.state_dict()) for m in (model, twin))
        keys = sorted(k for k in theirs if not k.endswith("_extra_state"))
        differ = [k for k in keys if k not in mine or mine[k].dtype != theirs[k].dtype
                  or not torch.equal(mine[k], theirs[k])]
        out = Path(os.environ["EAFT_PROBE_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(dict(
            from_hf=hf_weights, keys=keys, differ=differ,
            extra=sorted(set(mine) - set(theirs) - {k for k in mine if "_extra_state" in k}),
            numel=sum(theirs[k].numel() for k in keys))))
        del twin
        return model

    return provider


if __name__ == "__main__":
    from eaft_megatron.compat.lazy_compile import defer_torch_compile

    defer_torch_compile()  # as the trainer's entry point does, before megatron's import
    from eaft_megatron.train import __main__ as entry
    from eaft_megatron.train import steps

    entry.quiet_no_cuda_notice()
    steps.model_provider = _probed(steps.model_provider)
    sys.exit(entry.main())
