"""One forward pass of a megatron model in a spawned rank, for logits comparisons."""

from __future__ import annotations

import torch


def pipeline_logits(model, input_ids: torch.Tensor):
    """Logits [b, s, padded vocab] on the last pipeline stage (None elsewhere), gathered over
    TP; with PP each stage receives its input from the previous stage and sends its output on
    (plain point-to-point, no schedule: forward only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = input_ids.shape
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids, torch.arange(s).expand(b, s), None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return gather_from_tensor_model_parallel_region(out)
