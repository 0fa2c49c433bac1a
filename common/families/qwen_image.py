"""Qwen-Image (QwenImagePipeline): the prompt as the last hidden states of a Qwen2.5-VL language model reading it in a
chat template (the template's own tokens dropped, prompts of different lengths padded and masked), a transformer that
reads 2 x 2 patches of the latents as tokens (packed as FLUX packs them), true classifier-free guidance with a
negative prompt whose result is rescaled to the conditional prediction's norm, a rectified flow with dynamic shifting,
and a video VAE used for one frame, with a mean and std per latent channel."""

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders import QwenImageLoraLoaderMixin
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from common.families.flux import linear_sigmas, pack, unpack
from common.families.sd3 import LORA_TARGETS_MMDIT
from common.models import Conditioning, Model

# QwenImagePipeline's prompt template, and the number of its tokens before the prompt (dropped from the states)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial"
    " relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
MAX_TOKENS = 512  # the pipeline's max_sequence_length: the prompt's states are cut there


class QwenImage(Model):
    family, pipeline, hub_tag = "qwen_image", "QwenImagePipeline", "qwen-image"
    lora_loader = QwenImageLoraLoaderMixin
    text_encoder_classes = [("text_encoder", "tokenizer", Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer)]
    denoiser_class, vae_class, packed = QwenImageTransformer2DModel, AutoencoderKLQwenImage, True
    lora_targets = LORA_TARGETS_MMDIT  # the image and text streams' attention projections, as SD 3's
    negative_prompt = " "  # the model card's example: QwenImagePipeline guides only when it is given a negative prompt

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Each prompt in the template, through the language model; of each row's real tokens (its attention mask),
        the states after the template's first 34 tokens, padded with zeros to the batch's longest and masked, at most
        512 (as QwenImagePipeline.encode_prompt)."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        tokens = tokenizer(
            [TEMPLATE.format(p) for p in prompts],
            max_length=1024 + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        output = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        real = tokens.attention_mask.bool()  # (B, L): rows may be padded on either side
        rows = [states[keep][TEMPLATE_TOKENS:] for states, keep in zip(output.hidden_states[-1], real)]
        length = min(max(len(row) for row in rows), MAX_TOKENS)
        embeds = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, : len(row)], mask[i, : len(row)] = row[:length], True
        return Conditioning(embeds, mask=mask)

    def call(self, tokens, t, cond: Conditioning, h: int, w: int) -> torch.Tensor:
        """The transformer on packed latents (B, h/2 * w/2, 4C) at sigma = t / 1000; its packed output in fp32."""
        t = (t.expand(len(tokens)) if t.ndim == 0 else t) / 1000
        output = self.denoiser(
            hidden_states=tokens.to(self.dtype),
            timestep=t,
            encoder_hidden_states=cond.embeds.to(self.dtype),
            encoder_hidden_states_mask=cond.mask,
            img_shapes=[[(1, h // 2, w // 2)]] * len(tokens),
        )
        return output.sample.float()

    def denoise(self, latents, t, cond: Conditioning) -> torch.Tensor:
        _, _, h, w = latents.shape
        return unpack(self.call(pack(latents), t, cond, h, w), h, w)

    def guide(self, latents, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """True classifier-free guidance, u + w (c - u) from one batched call on [negative; conditional], then each
        token's prediction rescaled to the norm of its conditional prediction, ||c|| / ||u + w (c - u)|| (norms over
        a packed token's 4C values), as QwenImagePipeline does. No guidance (one call) when w <= 1."""
        if guidance_scale <= 1.0:
            return self.denoise(latents, t, cond)
        _, _, h, w = latents.shape
        uncond = self.uncond.map(lambda x: x.expand(len(latents), *x.shape[1:]))
        t = torch.cat([t, t]) if t.ndim else t
        tokens = pack(torch.cat([latents, latents]))
        output_uncond, output_cond = self.call(tokens, t, Conditioning.cat([uncond, cond]), h, w).chunk(2)
        guided = output_uncond + guidance_scale * (output_cond - output_uncond)
        guided = guided * (output_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack(guided, h, w)

    def flow_timesteps(self, num_steps: int) -> dict:
        """QwenImagePipeline's: 1, ..., 1 / T shifted by mu from the image's packed token count (and stretched to the
        scheduler's shift_terminal where its config has one)."""
        return {"sigmas": linear_sigmas(num_steps), **self.dynamic_shift()}

    # ---- the VAE: a video VAE on one frame, normalised per channel ----
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # as the pipeline computes it

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latents mean and std, (1, C, 1, 1, 1)."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        return mean, torch.tensor(config.latents_std, device=self.device).view(1, -1, 1, 1, 1)

    def vae_decode(self, latents) -> torch.Tensor:
        mean, std = self.latent_statistics()
        z = latents[:, :, None] * std + mean  # (B, C, 1, h, w): one frame
        return self.vae.decode(z.to(self.vae.dtype)).sample[:, :, 0].float()

    def vae_encode(self, images) -> torch.Tensor:
        mean, std = self.latent_statistics()
        latents = self.vae.encode(images[:, :, None].to(self.vae.dtype)).latent_dist.mean.float()
        return ((latents - mean) / std)[:, :, 0]

    def pipeline_call(self, num_steps: int, guidance_scale: float) -> str:
        return f'negative_prompt=" ", true_cfg_scale={guidance_scale}, num_inference_steps={num_steps}'
