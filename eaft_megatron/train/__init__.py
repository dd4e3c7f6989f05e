"""SFT with EAFT in Megatron-LM's own training loop (``megatron.training.pretrain``).

    torchrun --nproc-per-node 8 -m eaft_megatron.train \\
        --load runs/qwen3-eaft --save runs/qwen3-eaft --pretrained-checkpoint ckpt/qwen3-8b-mcore \\
        --data-path data/math --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --micro-batch-size 1 --global-batch-size 64 --train-iters 1000 --lr 1e-5 --bf16 \\
        --lr-decay-style cosine --save-interval 200 --eval-interval 100 --eval-iters 10 \\
        --loss-type eaft --eaft-top-k 20 --eaft-alpha 1.0

    python -m eaft_megatron.train --load runs/qwen3-eaft --data-path data/heldout \\
        --eval-only --eval-iters 20 --micro-batch-size 1 --global-batch-size 8   # evaluation only

Running the same command again resumes the latest complete checkpoint of ``--save`` (see
``restart.py``). ``--load`` / ``--pretrained-checkpoint`` may also name a Hugging Face model
directory (config.json + safetensors): each rank reads its own share of it (``hf_load.py``).
The model architecture comes from the HF config stored with the checkpoint
(``<load>/hf/``, written by ``eaft-megatron convert hf-to-megatron`` and copied into ``--save``)
or ``--hf-config DIR``; the padded vocabulary from the checkpoint. Every other flag is Megatron-LM's
(checkpointing, schedules, optimizer, logging). The same command runs on GPUs (NCCL, the
transformer-engine spec when installed) and on CPU (gloo, fp32, ``eaft_megatron.compat``'s CPU
layer and flags, added automatically). Loss: sum of ``w_t * CE_t`` over the global batch divided
by its number of supervised tokens (``--calculate-per-token-loss``, always on). Logged through
Megatron (stdout, TensorBoard, W&B): ``lm loss`` (plain CE), ``<loss_type> loss``, ``gate
weight``, ``entropy``, ``confident conflicts`` (see ``eaft_megatron.megatron.loss``), and one
JSON line per logged iteration / evaluation in ``<--log-dir or --save>/metrics.jsonl`` (MoE
models: also the load-balancing loss and the expert load, see ``metrics.py``).

==============  ==============================================================================
``main.py``     the entry point: ``--help``, command line, CPU setup, HF config into ``--save``,
                pretrain(), one-line errors
``argv.py``     completing the command line; with ``flags.py`` (reading flags),
                ``arch_flags.py`` (HF config -> Megatron-LM flags), ``preflight.py`` (one-line
                checks: data, sizes, EAFT flags, the checkpoint to load)
``restart.py``  where a run starts: resume ``--save``'s latest complete checkpoint or fine-tune
``hf_load.py``  starting from a Hugging Face directory: pre-flight checks, each rank filling its
                own parameters from the safetensors (no conversion step)
``guard.py``    non-finite guard (loss, gradient norm, parameters before save), no roll-back save
``steps.py``    model provider, forward step + loss function, datasets provider
``metrics.py``  ``metrics.jsonl`` (hooks on Megatron's ``training_log`` / ``evaluate``)
``landscape.py`` ``--eaft-landscape DIR``: entropy x p(label) histogram, most conflicting
                conversations (file and line), picture (``eaft-megatron landscape``); the
                statistics in ``landscape_stats.py``, the files in ``landscape_output.py``
==============  ==============================================================================
"""


def main(argv=None) -> int:
    from .main import main as _main

    return _main(argv)


__all__ = ["main"]
