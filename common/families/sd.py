"""Stable Diffusion 1.x and 2.x (StableDiffusionPipeline): one CLIP text encoder, a UNet predicting eps or v on SD's
VP path (DDIM), the KL VAE with its scaling factor."""

from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from common.models import Conditioning, Model


class StableDiffusion(Model):
    family, pipeline, hub_tag = "sd", "StableDiffusionPipeline", "stable-diffusion"
    lora_loader = StableDiffusionLoraLoaderMixin
    text_encoder_classes = [("text_encoder", "tokenizer", CLIPTextModel, CLIPTokenizer)]
    denoiser_class, denoiser_folder, lora_prefix = UNet2DConditionModel, "unet", "unet"
    flow = False

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The text encoder's last hidden state after its final layer norm (clip_skip None; for SD 2.x that is
        OpenCLIP's penultimate layer: the converted encoder has its last layer dropped)."""
        return Conditioning(self.text_encoders[0](self.token_ids(0, prompts))[0])

    def denoise(self, latents, t, cond: Conditioning):
        latents, embeds = latents.to(self.dtype), cond.embeds.to(self.dtype)
        return self.denoiser(latents, t, encoder_hidden_states=embeds).sample.float()
