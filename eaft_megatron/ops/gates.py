"""Per-token loss weights of the SFT / DFT / EAFT family.

Every method of the family is ``loss_t = w_t * CE_t`` with a weight ``w_t`` that is a small,
detached function of per-token statistics the loss kernel already has:

=========  =================================================================================
loss_type  weight ``w_t`` (no gradient flows through it)
=========  =================================================================================
``sft``    ``1``
``dft``    ``p_t(y_t) ** alpha`` (Dynamic Fine-Tuning, arXiv 2508.05629)
``eaft``   ``(H_t / ln top_k) ** alpha`` (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151)
=========  =================================================================================

``H_t`` is the entropy (nats) of the softmax renormalised over the ``top_k`` largest logits
(``entropy="topk"``, the paper's gate) or of the full-vocabulary softmax (``entropy="full"``).
The normaliser is ``ln(top_k)`` exactly (LLaMA-Factory uses the literal 3.0 for K=20, axolotl
forgets it). The ratio is clamped to ``[0, 1]``: in ``topk`` mode this only removes rounding
(``H_topK <= ln K`` holds mathematically), in ``full`` mode it is the documented
``min(H / ln top_k, 1)``. NaN propagates through the clamp, so broken logits stay visible.
"""

from __future__ import annotations

import math

import torch

LOSS_TYPES = ("sft", "dft", "eaft")
ENTROPY_MODES = ("topk", "full")


def validate_gate_options(*, loss_type: str, top_k: int, alpha: float, entropy: str,
                          vocab: int | None = None) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the bad option. With ``vocab`` (the number of
    real token ids), an EAFT gate whose ``top_k`` exceeds it is refused: the top-K entropy would
    silently be the full one and ``ln(top_k)`` would keep every weight below 1."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} ({top_k!r})")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if loss_type == "eaft" and top_k < 2:
        raise ValueError(
            f"top_k must be >= 2 for loss_type='eaft': the gate divides by ln(top_k), got {top_k}"
        )
    if loss_type == "eaft" and vocab is not None and top_k > vocab:
        raise ValueError(f"top_k={top_k} is larger than the vocabulary ({vocab} ids): the EAFT "
                         f"gate needs top_k <= vocabulary size")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} ({alpha!r})")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")


def token_weight(
    *,
    loss_type: str,
    target_prob: torch.Tensor,
    entropy: torch.Tensor | None,
    top_k: int,
    alpha: float,
) -> torch.Tensor:
    """The detached per-token weight ``w_t`` (float32, same shape as ``target_prob``).

    ``entropy`` is only read for ``loss_type="eaft"``.
    """
    if loss_type == "sft":
        return torch.ones_like(target_prob)
    if loss_type == "dft":
        return target_prob.pow(alpha) if alpha != 1.0 else target_prob.clone()
    assert entropy is not None
    ratio = (entropy / math.log(top_k)).clamp(0.0, 1.0)
    return ratio.pow(alpha) if alpha != 1.0 else ratio
