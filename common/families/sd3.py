"""Stable Diffusion 3 and 3.5 (StableDiffusion3Pipeline): two CLIP encoders and T5 (optional), an MMDiT transformer
predicting the velocity eps - x0 of a rectified flow (alpha = 1 - sigma), the flow scheduler's sigmas with its fixed
shift, and a VAE that shifts its latents."""

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from common.families.sdxl import clip_states
from common.models import LORA_TARGETS, Conditioning, Model

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
# the MMDiT's image and text streams' attention projections (as diffusers' SD 3 LoRA example)
LORA_TARGETS_MMDIT = LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class StableDiffusion3(Model):
    family, pipeline, hub_tag = "sd3", "StableDiffusion3Pipeline", "sd3"
    lora_loader = SD3LoraLoaderMixin
    text_encoder_classes = [
        ("text_encoder", "tokenizer", CLIPTextModelWithProjection, CLIPTokenizer),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, CLIPTokenizer),
        ("text_encoder_3", "tokenizer_3", T5EncoderModel, T5TokenizerFast),
    ]
    denoiser_class, lora_targets = SD3Transformer2DModel, LORA_TARGETS_MMDIT

    @classmethod
    def text_encoders_to_load(cls, index: dict, t5: bool) -> list:
        """Without T5 (`t5` False, or a folder saved without it) as the pipeline's text_encoder_3=None."""
        return cls.text_encoder_classes[: 3 if t5 and (index.get("text_encoder_3") or [None])[0] else 2]

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The two CLIP encoders' penultimate states side by side, padded to T5's width, then T5's 256 token states
        (zeros without T5); both CLIP encoders' pooled projections side by side (2048 at SD 3's scale)."""
        embeds, pooled = clip_states(self, prompts)
        width = self.denoiser.config.joint_attention_dim
        if len(self.text_encoders) == 3:
            t5 = self.text_encoders[2](self.token_ids(2, prompts, T5_TOKENS))[0]
        else:  # StableDiffusion3Pipeline with text_encoder_3=None
            t5 = embeds.new_zeros(len(prompts), T5_TOKENS, width)
        embeds = torch.cat([F.pad(embeds, (0, width - embeds.shape[-1])), t5], dim=1)  # (B, 77 + 256, width)
        return Conditioning(embeds, torch.cat(pooled, dim=-1))

    def denoise(self, latents, t, cond: Conditioning):
        latents, cond = latents.to(self.dtype), cond.map(lambda x: x.to(self.dtype))
        t = t.expand(len(latents)) if t.ndim == 0 else t
        output = self.denoiser(
            hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
        )
        return output.sample.float()

    def flow_timesteps(self, num_steps: int) -> dict:
        """SD 3 and 3.5 shift their sigmas by a fixed shift (in the scheduler's config); a config with dynamic
        shifting gets mu from the image's token count, as the pipeline computes it."""
        return {"num_inference_steps": num_steps, **self.dynamic_shift()}
