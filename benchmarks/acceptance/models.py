"""Stage models: random HF Qwen3 / GLM-4-0414 models -> ``hf_to_megatron`` -> ``build_gpt_model``
(TE spec when installed) loaded with megatron-core's ``dist_checkpointing``: logits vs
transformers in fp32 and bf16. ``save_random_hf_model`` also serves the train stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .common import ModelSize, Profile, Stage, fmt, single_rank_group, strict_fp32


def make_hf_config(arch: str, m: ModelSize, *, max_positions: int):
    import transformers

    common = dict(hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
                  num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
                  vocab_size=m.vocab, max_position_embeddings=max_positions, rms_norm_eps=1e-6)
    if arch == "qwen3":  # the small Qwen3 models tie the output layer to the embedding
        return transformers.Qwen3Config(architectures=["Qwen3ForCausalLM"],
                                        tie_word_embeddings=True, rope_theta=1e6, **common)
    if arch == "glm4":  # GLM-4-0414: qkv bias, half-rotary interleaved, sandwich norms
        return transformers.Glm4Config(architectures=["Glm4ForCausalLM"],
                                       tie_word_embeddings=False, attention_bias=True,
                                       partial_rotary_factor=0.5, rope_theta=10000.0,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=None, **common)
    raise ValueError(arch)


def save_random_hf_model(arch: str, m: ModelSize, out: Path, *, max_positions: int,
                         seed: int = 0, randomize: bool = True) -> Path:
    """A random fp32 model saved with save_pretrained. ``randomize``: every tensor random
    (norms around 1, biases around 0; HF's unit norms and zero biases would hide a swapped
    mapping); otherwise HF's own initialisation (near-uniform predictions: for training)."""
    import torch
    import transformers

    config = make_hf_config(arch, m, max_positions=max_positions)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters() if randomize else ():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif "embed" in name:
                p.copy_(0.15 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    model.save_pretrained(out)
    return out


def _megatron_model(hf_dir: Path, ckpt: Path, device, dtype, te: bool):
    """``build_gpt_model`` (TE or local spec) filled from the converted checkpoint with
    megatron-core's own ``dist_checkpointing.load`` (as Megatron-LM loads checkpoints)."""
    import torch
    from megatron.core import dist_checkpointing

    from eaft_megatron.checkpoint import CONVERTED_MARK, find_iteration_dir
    from eaft_megatron.checkpoint.safe_load import safe_checkpoint_loading
    from eaft_megatron.convert import load_hf_config
    from eaft_megatron.models import build_gpt_model

    hf_config = load_hf_config(hf_dir)
    meta = json.loads((ckpt / CONVERTED_MARK).read_text())
    kwargs = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16,
                  transformer_impl="transformer_engine" if te else "local")
    if device.type == "cpu":
        from eaft_megatron.compat import cpu_transformer_config_kwargs

        kwargs = {**cpu_transformer_config_kwargs(), **kwargs}
    model = build_gpt_model(hf_config, padded_vocab=meta["padded_vocab_size"], **kwargs)
    model.to(device)
    iter_dir = find_iteration_dir(ckpt)
    with safe_checkpoint_loading():  # nothing in the checkpoint is unpickled freely
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint {iter_dir} did not fill {missing[:6]}")
    model.eval()
    return model


def stage_models(stage: Stage, device, P: Profile) -> None:
    import torch
    import transformers

    from eaft_megatron.convert import hf_to_megatron
    from eaft_megatron.models import te_available

    strict_fp32()
    work = stage.work
    batch, seq = P.model_tokens
    prepared = {}
    for arch in ("qwen3", "glm4"):  # conversion first, in its own one-process group
        with stage.check(f"{arch} convert") as rec:
            t0 = time.perf_counter()
            size = getattr(P, arch)
            hf_dir = save_random_hf_model(arch, size, work / arch / "hf", max_positions=seq * 2)
            ckpts = {d: hf_to_megatron(hf_dir, work / arch / f"mcore_{d}", tp=1, dtype=d,
                                       progress=False, force=True) for d in ("fp32", "bf16")}
            prepared[arch] = (hf_dir, ckpts)
            rec.verdict(True, f"hidden {size.hidden}, {size.layers} layers, heads {size.heads}/"
                              f"{size.kv_heads}, head_dim {size.head_dim}, vocab {size.vocab}: "
                              f"fp32 and bf16 checkpoints in {time.perf_counter() - t0:.1f} s")

    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cpu":
        from eaft_megatron.compat import install_cpu_compat

        install_cpu_compat()
    single_rank_group(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    te = te_available()
    stage.info("spec", "transformer_engine" if te else "local",
               f"Megatron layer spec: {'TransformerEngine' if te else 'local (no TE installed)'}")
    rows = []
    stage.data["tables"]["models"] = rows
    for arch, (hf_dir, ckpts) in prepared.items():
        ids = torch.randint(0, getattr(P, arch).vocab, (batch, seq),
                            generator=torch.Generator().manual_seed(3)).to(device)
        pos = torch.arange(seq, device=device).expand(batch, seq)
        hf_logits = {}
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=dtype, attn_implementation="eager").to(device).eval()
            with torch.no_grad():
                hf_logits[dname] = hf(ids).logits.float()
            del hf
        ref = hf_logits["fp32"]
        vocab = ref.shape[-1]
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            with stage.check(f"{arch} {dname} logits vs transformers") as rec:
                model = _megatron_model(hf_dir, ckpts[dname], device, dtype, te)
                with torch.no_grad():
                    logits = model(ids, pos, None)[..., :vocab].float()
                del model
                err = (logits - ref).abs()
                scale = max(1.0, ref.abs().max().item())
                row = dict(model=arch, dtype=dname, spec="te" if te else "local",
                           tokens=f"{batch}x{seq}", max_abs_logit=round(ref.abs().max().item(), 2),
                           max_err=float(f"{err.max().item():.3g}"),
                           mean_err=float(f"{err.mean().item():.3g}"))
                if dname == "fp32":
                    tol = stage.tol("model_fp32_rel")
                    ok = err.max().item() / scale <= tol
                    text = (f"max |err| {fmt(err.max().item())} = {fmt(err.max().item() / scale)}"
                            f" of max |logit| {scale:.1f} (tolerance {fmt(tol)})")
                else:
                    base = (hf_logits["bf16"] - ref).abs()
                    vs_hf = (logits - hf_logits["bf16"]).abs()
                    fm, fx = stage.tol("model_bf16_mean_factor"), stage.tol("model_bf16_max_factor")
                    ok = (err.mean().item() <= fm * base.mean().item() + 1e-6 and
                          err.max().item() <= fx * base.max().item() + 1e-6)
                    agree = (logits.argmax(-1) == hf_logits["bf16"].argmax(-1)).float().mean()
                    row.update(hf_bf16_max_err=float(f"{base.max().item():.3g}"),
                               hf_bf16_mean_err=float(f"{base.mean().item():.3g}"),
                               vs_hf_bf16_max=float(f"{vs_hf.max().item():.3g}"),
                               argmax_agree=round(agree.item(), 4))
                    text = (f"vs transformers fp32: mean |err| {fmt(err.mean().item())}, max "
                            f"{fmt(err.max().item())}; transformers bf16's own: mean "
                            f"{fmt(base.mean().item())}, max {fmt(base.max().item())} "
                            f"(tolerance {fm}x mean, {fx}x max); vs transformers bf16: max "
                            f"{fmt(vs_hf.max().item())}, argmax agreement {agree.item():.3f}")
                rows.append(row)
                rec.verdict(ok, text, **{k: v for k, v in row.items() if k != "model"})
        del hf_logits, ref
    parallel_state.destroy_model_parallel()
