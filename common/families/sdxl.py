"""SDXL (StableDiffusionXLPipeline): two CLIP text encoders side by side, whose second's pooled projection and the
image's size ("time ids") are added to the UNet's timestep embedding; eps on SD's VP path (DDIM)."""

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from common.families.sd import StableDiffusion
from common.models import Conditioning


def clip_states(model, prompts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The two CLIP encoders' penultimate states side by side (SDXL: 768 + 1280 = 2048) and each one's first output
    (the projected pooled embedding where the encoder has a projection): SDXL's and SD 3's prompt encoding."""
    states, pooled = [], []
    for i in range(2):
        output = model.text_encoders[i](model.token_ids(i, prompts), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled.append(output[0])
    return torch.cat(states, dim=-1), pooled


class StableDiffusionXL(StableDiffusion):
    family, pipeline, hub_tag = "sdxl", "StableDiffusionXLPipeline", "stable-diffusion-xl"
    lora_loader = StableDiffusionXLLoraLoaderMixin
    text_encoder_classes = [
        ("text_encoder", "tokenizer", CLIPTextModel, CLIPTokenizer),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, CLIPTokenizer),
    ]

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Both encoders' penultimate states, the second's projected pooled embedding, and the time ids of a square
        image at the model's resolution, uncropped: (size, size, 0, 0, size, size)."""
        embeds, pooled = clip_states(self, prompts)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.device)
        return Conditioning(embeds, pooled[1], time_ids.expand(len(prompts), -1))

    def unconditional(self) -> Conditioning:
        """The empty prompt's conditioning, or zeros in place of its text embeddings where the pipeline says
        force_zeros_for_empty_prompt (SDXL base does), as the pipeline does."""
        uncond = self.encode([""])
        if self.index.get("force_zeros_for_empty_prompt", True):
            return Conditioning(uncond.embeds * 0, uncond.pooled * 0, uncond.time_ids)
        return uncond

    def denoise(self, latents, t, cond: Conditioning):
        latents, cond = latents.to(self.dtype), cond.map(lambda x: x.to(self.dtype))
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.denoiser(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample.float()
