"""FLUX.1-dev and FLUX.1-schnell (FluxPipeline): CLIP's pooled embedding and T5's token states, a transformer that
reads 2 x 2 patches of the latents as tokens (packed outside it, with each token's position as ids), a rectified flow
whose sigmas are shifted by the image's token count (dynamic shifting), and SD 3's VAE normalisation.

FLUX.1-dev is guidance-distilled: the guidance value is an input of the transformer (embedded like the timestep), and
each step is one call, with no classifier-free guidance; --guidance-scale is that input (its pipeline's default is
3.5). FLUX.1-schnell has no guidance input: --guidance-scale does nothing there."""

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from common.cli import fail
from common.families.sd3 import LORA_TARGETS_MMDIT
from common.models import Conditioning, Model

T5_TOKENS = 512  # FluxPipeline's max_sequence_length


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2 x 2 patch one token, its channels in (c, dy, dx) order."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`pack`'s inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def linear_sigmas(num_steps: int) -> np.ndarray:
    """The sigmas FLUX's and Qwen-Image's pipelines start from, before the shift: 1, ..., 1 / T, evenly spaced."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


class Flux(Model):
    family, pipeline, hub_tag = "flux", "FluxPipeline", "flux"
    lora_loader = FluxLoraLoaderMixin
    text_encoder_classes = [
        ("text_encoder", "tokenizer", CLIPTextModel, CLIPTokenizer),
        ("text_encoder_2", "tokenizer_2", T5EncoderModel, T5TokenizerFast),
    ]
    denoiser_class, packed = FluxTransformer2DModel, True
    # the attention projections of the double-stream blocks' image and text streams, as SD 3's, and of the
    # single-stream blocks (which have no output projection of their own: to_q, to_k and to_v match them)
    lora_targets = LORA_TARGETS_MMDIT

    @classmethod
    def text_encoders_to_load(cls, index: dict, t5: bool) -> list:
        if not t5:
            fail("--no-t5 leaves out a T5 encoder where it is optional (SD 3); FLUX.1's prompt is T5's token states")
        return cls.text_encoder_classes

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """T5's last hidden states of the prompt padded to 512 tokens, and CLIP's pooled output (its text embedding
        before any projection), as FluxPipeline.encode_prompt."""
        pooled = self.text_encoders[0](self.token_ids(0, prompts)).pooler_output
        embeds = self.text_encoders[1](self.token_ids(1, prompts, T5_TOKENS))[0]
        return Conditioning(embeds, pooled)

    def unconditional(self) -> None:
        return None  # no classifier-free guidance

    def guide(self, latents, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """One call: FLUX.1-dev takes the guidance value as an input, FLUX.1-schnell takes none."""
        return self.denoise(latents, t, cond, guidance_scale)

    def training_guidance(self, guidance_scale: float) -> float:
        """FLUX.1-dev's denoising loss regresses the prediction at its guidance input, as diffusers' FLUX LoRA
        training does (3.5 by default there); schnell has none."""
        return guidance_scale

    def denoise(self, latents, t, cond: Conditioning, guidance_scale: float = 1.0) -> torch.Tensor:
        """The transformer on the packed latents, with each image token's (0, row, column) as its position id and
        zeros as the text tokens', the timestep as sigma = t / 1000 and, for FLUX.1-dev, the guidance value."""
        b, _, h, w = latents.shape
        t = (t.expand(b) if t.ndim == 0 else t) / 1000
        rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).flatten(0, 1).float().to(self.device)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), guidance_scale, device=self.device)
        output = self.denoiser(
            hidden_states=pack(latents).to(self.dtype),
            timestep=t,
            guidance=guidance,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
        )
        return unpack(output.sample.float(), h, w)

    def flow_timesteps(self, num_steps: int) -> dict:
        """FluxPipeline's: 1, ..., 1 / T shifted by mu from the image's packed token count."""
        if self.scheduler.config.get("use_flow_sigmas"):
            return {"num_inference_steps": num_steps, **self.dynamic_shift()}
        return {"sigmas": linear_sigmas(num_steps), **self.dynamic_shift()}

    def pipeline_call(self, num_steps: int, guidance_scale: float) -> str:
        guidance = f", guidance_scale={guidance_scale}" if self.denoiser.config.guidance_embeds else ""
        return f"num_inference_steps={num_steps}{guidance}"
