"""What a DRaFT-1 step of FLUX.1 and Qwen-Image needs in GPU memory at 1024 px, batch 1, LoRA, bf16, from the published
configs' shapes, without their weights: each module built on PyTorch's meta device (shapes, no data) to count its
parameters, then one denoiser call and one VAE decode run there with autograd on, counting the bytes of every tensor
kept for the backward pass (the memory a step with gradient holds at its peak). SDXL is measured the same way to
check the method against the one GPU measurement (docs/BENCHMARKS.md: 32.9 GB at SDXL's shapes).

    python benchmarks/speed/family_memory.py              # a minute on a CPU; docs/results/family_memory.json

On a GPU, attention runs in a fused kernel that keeps its inputs, its output and one log-sum-exp per row, not the
attention matrix: the count replaces scaled_dot_product_attention by a function that keeps exactly those. Weights that
a backward pass reads are not counted twice. What is not counted: the backward pass's own temporaries (about one
activation at a time), the allocator's slack, CUDA's context (~0.5 GB) and the reward model (the aesthetic reward's
CLIP ViT-L: 0.9 GB in bf16)."""

import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.families.sd3 import LORA_TARGETS_MMDIT  # noqa: E402
from common.models import LORA_TARGETS  # noqa: E402

GB = 2**30  # GiB, as torch.cuda.max_memory_allocated is read in the runs' metrics


@dataclass
class Args:
    resolutions: tuple[int, ...] = (512, 768, 1024)
    """image heights and widths in pixels"""
    lora_rank: int = 8
    """the LoRA's rank (draft_k.py's default)"""
    out: str = "docs/results/family_memory.json"
    """where the numbers go"""


class FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused GPU kernel (flash or memory-efficient attention) keeps it for the
    backward pass: q, k, v, the output and a log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return FusedAttention.apply(query, key, value)


def saved_bytes(module: torch.nn.Module, run, blockwise: bool = False) -> int:
    """The bytes of the distinct tensors autograd keeps while `run()` calls `module` (its parameters excluded). With
    `blockwise`, as --gradient-checkpointing runs it: each block's inputs are kept, and its own activations only while
    it is recomputed (the largest block's are added once)."""
    parameters = {p.untyped_storage()._cdata for p in module.parameters()}
    storages, largest_block = {}, [0]

    def keeper(into: dict):
        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in parameters:
                into[storage._cdata] = storage.nbytes()
            return tensor

        return keep

    def block_checkpoint(block, *args):
        for arg in args:
            for tensor in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(tensor, torch.Tensor):
                    keeper(storages)(tensor)
        own = {}
        with torch.autograd.graph.saved_tensors_hooks(keeper(own), lambda tensor: tensor):
            output = block(*args)
        largest_block[0] = max(largest_block[0], sum(own.values()))
        return output

    if blockwise:
        module.enable_gradient_checkpointing(block_checkpoint)
    real, F.scaled_dot_product_attention = F.scaled_dot_product_attention, fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(keeper(storages), lambda tensor: tensor):
            run()
    finally:
        F.scaled_dot_product_attention = real
        if blockwise:
            module.disable_gradient_checkpointing()
    return sum(storages.values()) + largest_block[0]


def on_meta(build) -> torch.nn.Module:
    with torch.device("meta"):
        return build().to(torch.bfloat16)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_lora(module, rank: int, targets: list[str]) -> int:
    """The LoRA the scripts add (fp32); returns its parameter count."""
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    lora = [p for p in module.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    return sum(p.numel() for p in lora)


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
    return CLIPTextModel(config)


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config)


def qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                         rope_scaling=dict(mrope_section=[16, 24, 24], rope_type="default", type="default")),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        vocab_size=152064, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


def measure_flux(args, resolution: int) -> dict:
    from diffusers import FluxTransformer2DModel

    transformer = on_meta(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56],
    ))  # fmt: skip
    denoiser = count(transformer)  # before the LoRA
    lora = with_lora(transformer, args.lora_rank, LORA_TARGETS_MMDIT)
    tokens = (resolution // 16) ** 2  # 8x VAE, 2 x 2 patches

    def call():  # one call: FLUX.1-dev is guidance-distilled
        transformer(hidden_states=empty(1, tokens, 64), timestep=empty(1, dtype=torch.float32),
                    guidance=empty(1, dtype=torch.float32), pooled_projections=empty(1, 768),
                    encoder_hidden_states=empty(1, 512, 4096), txt_ids=empty(512, 3, dtype=torch.float32),
                    img_ids=empty(tokens, 3, dtype=torch.float32))  # fmt: skip

    vae = on_meta(flux_vae)
    latent = resolution // 8
    return {
        "denoiser": denoiser, "lora": lora, "denoiser_call": saved_bytes(transformer, call),
        "denoiser_call_blocks": saved_bytes(transformer, call, blockwise=True),
        "text_encoders": {"CLIP ViT-L": count(on_meta(clip_l)), "T5-XXL": count(on_meta(t5_xxl))},
        "vae": count(vae), "vae_decode": vae_decode_bytes(vae, empty(1, 16, latent, latent)),
    }  # fmt: skip


def measure_qwen_image(args, resolution: int) -> dict:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformer = on_meta(QwenImageTransformer2DModel)  # its defaults are Qwen-Image's published config
    denoiser = count(transformer)  # before the LoRA
    lora = with_lora(transformer, args.lora_rank, LORA_TARGETS_MMDIT)
    side = resolution // 16
    text = 40  # a prompt of about 30 words in the template, its template tokens dropped

    def call():  # true classifier-free guidance: the negative and the conditional prompt in one batch of 2
        transformer(hidden_states=empty(2, side * side, 64), timestep=empty(2, dtype=torch.float32),
                    encoder_hidden_states=empty(2, text, 3584), encoder_hidden_states_mask=None,
                    img_shapes=[[(1, side, side)]] * 2)  # fmt: skip

    vae = on_meta(lambda: AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                  temperal_downsample=[False, True, True]))  # fmt: skip
    latent = resolution // 8
    return {
        "denoiser": denoiser, "lora": lora, "denoiser_call": saved_bytes(transformer, call),
        "denoiser_call_blocks": saved_bytes(transformer, call, blockwise=True),
        "text_encoders": {"Qwen2.5-VL-7B": count(on_meta(qwen25_vl_7b))},
        "vae": count(vae), "vae_decode": vae_decode_bytes(vae, empty(1, 16, 1, latent, latent)),
    }  # fmt: skip


def measure_sdxl(args, resolution: int) -> dict:
    """SDXL base at its published shapes (as benchmarks/shared.py builds it), guided: a batch of 2."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    unet = on_meta(lambda: UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ))  # fmt: skip
    denoiser = count(unet)  # before the LoRA
    lora = with_lora(unet, args.lora_rank, LORA_TARGETS)
    latent = resolution // 8

    def call():
        added = {"text_embeds": empty(2, 1280), "time_ids": empty(2, 6)}
        unet(empty(2, 4, latent, latent), empty(2, dtype=torch.float32), encoder_hidden_states=empty(2, 77, 2048),
             added_cond_kwargs=added)  # fmt: skip

    bigg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)  # fmt: skip
    vae = on_meta(lambda: flux_vae().__class__(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                               latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                               up_block_types=("UpDecoderBlock2D",) * 4))  # fmt: skip
    return {
        "denoiser": denoiser, "lora": lora, "denoiser_call": saved_bytes(unet, call),
        "denoiser_call_blocks": saved_bytes(unet, call, blockwise=True),
        "text_encoders": {"CLIP ViT-L": count(on_meta(clip_l)),
                          "OpenCLIP bigG": count(on_meta(lambda: CLIPTextModelWithProjection(bigg)))},
        "vae": count(vae), "vae_decode": vae_decode_bytes(vae, empty(1, 4, latent, latent)),
    }  # fmt: skip


def vae_decode_bytes(vae, latents) -> int:
    """The decode with gradient flowing back to the latents (DRaFT's reward gradient), checkpointed or not: its
    recomputation in the backward pass keeps what one decode keeps."""
    latents.requires_grad_(True)
    return saved_bytes(vae, lambda: vae.decode(latents))


def summary(name: str, resolution: int, m: dict, rank: int) -> dict:
    """GiB: weights in bf16, the LoRA with its gradient and Adam's two moments in fp32 (16 bytes a parameter), and
    the peak of a DRaFT-1 step: everything resident plus the larger of the two calls' kept activations (the VAE's
    backward ends before the denoiser's recomputation starts); then with the text encoders freed, and with both
    levers (--free-text-encoders --gradient-checkpointing)."""
    text = sum(m["text_encoders"].values())
    weights, text_weights = 2 * (m["denoiser"] + text + m["vae"]) / GB, 2 * text / GB
    lora = 16 * m["lora"] / GB
    step = weights + lora + max(m["denoiser_call"], m["vae_decode"]) / GB
    step_blocks = weights + lora + max(m["denoiser_call_blocks"], m["vae_decode"]) / GB
    return {
        "model": name, "resolution": resolution, "denoiser_B": m["denoiser"] / 1e9,
        "text_encoders_B": {k: v / 1e9 for k, v in m["text_encoders"].items()}, "vae_M": m["vae"] / 1e6,
        "lora_M": m["lora"] / 1e6, "lora_rank": rank, "weights_GiB": weights, "text_encoder_weights_GiB": text_weights,
        "lora_and_adam_GiB": lora, "denoiser_call_activations_GiB": m["denoiser_call"] / GB,
        "denoiser_call_activations_blockwise_GiB": m["denoiser_call_blocks"] / GB,
        "vae_decode_activations_GiB": m["vae_decode"] / GB, "draft1_step_GiB": step,
        "draft1_step_free_text_encoders_GiB": step - text_weights,
        "draft1_step_both_levers_GiB": step_blocks - text_weights,
    }  # fmt: skip


if __name__ == "__main__":
    args = tyro.cli(Args)
    measures = {"SDXL base 1.0 (guided: batch 2)": measure_sdxl, "FLUX.1-dev (one call a step)": measure_flux,
                "Qwen-Image (true guidance: batch 2)": measure_qwen_image}  # fmt: skip
    rows = [summary(name, r, measure(args, r), args.lora_rank) for name, measure in measures.items()
            for r in args.resolutions]  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch_size": 1, "lora_rank": args.lora_rank, "unit": "GiB", "rows": rows}, f, indent=1)
    print("| model | px | weights (bf16) | one call's activations | the same, blockwise | VAE decode's |"
          " DRaFT-1 step | --free-text-encoders | both levers |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        numbers = [
            "weights",
            "denoiser_call_activations",
            "denoiser_call_activations_blockwise",
            "vae_decode_activations",
            "draft1_step",
            "draft1_step_free_text_encoders",
            "draft1_step_both_levers",
        ]
        print(f"| {r['model']} | {r['resolution']} | " + " | ".join(f"{r[n + '_GiB']:.1f}" for n in numbers) + " |")
