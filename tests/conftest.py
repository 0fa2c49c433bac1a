"""Tiny random models in the Stable Diffusion pipeline format, built in code and saved with save_pretrained, so
the tests go through the same from_pretrained code as SD 1.4. No downloads: the hub is switched off."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: a test must never wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import AddedToken
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
)

from assets.train_tiny_sd import byte_alphabet, make_t5_tokenizer, make_tokenizer  # as the shipped tiny models' are
from common.families.qwen_image import TEMPLATE
from common.prompts import SIMPLE_ANIMALS

WORDS = SIMPLE_ANIMALS + ["a", "an", "photo", "of", "the", "on", "red", "green", "blue", "white", "background"]


def text_config(tokenizer, **kwargs) -> CLIPTextConfig:
    """SD 1.x's text encoder in miniature; `kwargs` override (SD 2.x's is wider and uses GELU)."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", **ids)  # fmt: skip
    return CLIPTextConfig(**(config | kwargs))


def build_tiny_sd(path, prediction_type: str = "epsilon") -> str:
    """A random SD-shaped pipeline: CLIP text encoder, UNet with cross-attention, KL VAE (scale factor 2), and SD's
    own scheduler config (PNDM, as the SD 1.4 repo ships it). `prediction_type` goes into that config: with
    "v_prediction" the same weights' output is read as v, as for SD 2.x at 768 px."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(WORDS)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16, scaling_factor=0.18215,
    )  # fmt: skip
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, prediction_type=prediction_type,
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(path)
    return str(path)


def build_tiny_sdxl(path, force_zeros_for_empty_prompt: bool = True) -> str:
    """A random SDXL-shaped pipeline: two CLIP text encoders (the second with a projection, whose pooled output and
    the six time ids are added to the timestep embedding: addition_embed_type "text_time"), a UNet whose
    cross-attention reads both encoders' states side by side (32 + 48), a VAE with SDXL's scaling factor, and the
    scheduler config SDXL base ships (Euler, steps_offset 1, "leading" spacing, no set_alpha_to_one)."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(WORDS), make_tokenizer(WORDS)
    tokenizer_2.pad_token = "!"  # OpenCLIP's padding, as SDXL's tokenizer_2
    text_encoder = CLIPTextModel(text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, hidden_size=48, projection_dim=40,
                                                             hidden_act="gelu"))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40,
        transformer_layers_per_block=(1, 2),
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )  # fmt: skip
    pipeline.save_pretrained(path)
    return str(path)


def build_tiny_sd3(path, t5: bool = True, shift: float = 3.0) -> str:
    """A random SD 3-shaped pipeline: two CLIP text encoders with projections (widths 32 and 48: 80 side by side,
    padded to T5's 96), a T5 encoder (dropped with t5=False, as text_encoder_3=None), an MMDiT transformer (patch 2)
    predicting a rectified flow's velocity, a VAE of 16 latent channels with a shift factor, and SD 3's flow
    scheduler config (shift 3)."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(WORDS), make_tokenizer(WORDS)
    tokenizer_2.pad_token = "!"
    text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, projection_dim=24))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, hidden_size=48, projection_dim=40,
                                                             hidden_act="gelu"))  # fmt: skip
    tokenizer_3 = make_t5_tokenizer(WORDS) if t5 else None
    t5_config = T5Config(vocab_size=len(tokenizer_3 or []), d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8)  # fmt: skip
    text_encoder_3 = T5EncoderModel(t5_config) if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=24 + 40,
        pos_embed_max_size=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipeline.save_pretrained(path)
    return str(path)


def build_tiny_flux(path, dev: bool = True) -> str:
    """A random FLUX.1-shaped pipeline: CLIP (its pooled output) and T5 (its token states), a transformer with one
    double- and one single-stream block reading 2 x 2-packed latents (4 channels: 16 a token), a VAE with a shift
    factor, and the scheduler config of FLUX.1-dev (dynamic shifting; `dev`, which also gives the transformer its
    guidance input) or FLUX.1-schnell (shift 1, no guidance input)."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(WORDS), make_t5_tokenizer(WORDS)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    t5_config = T5Config(vocab_size=len(tokenizer_2), d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8)  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    shifting = dict(use_dynamic_shifting=True, shift=3.0, base_image_seq_len=16, max_image_seq_len=256)
    scheduler = FlowMatchEulerDiscreteScheduler(**(shifting if dev else dict(shift=1.0)))
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=T5EncoderModel(
        t5_config), tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=None, feature_extractor=None,
    )  # fmt: skip
    pipeline.save_pretrained(path)
    return str(path)


def make_qwen_tokenizer(words) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer (byte-level BPE, GPT-2's bytes as characters, "Ġ" for a leading space) whose vocabulary is the
    byte alphabet plus each word with a leading space and the template's words that start a line, each one token, and
    the chat template's special tokens: the template's part before the prompt is 34 tokens, as with Qwen's own."""
    vocab, merges = {token: i for i, token in enumerate(byte_alphabet())}, []
    template_words = TEMPLATE.replace(",", " ").replace(":", " ").replace("\n", " ").split()
    leading = [w for w in template_words if "|" not in w]
    for word in [*(f"Ġ{w}" for w in dict.fromkeys(words + leading)), "Describe", "system", "user", "assistant"]:
        parts = list(word)  # merged left to right; the words with a space first, so that their merges come first
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((parts[0], parts[1]))
            parts = [merged, *parts[2:]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    return tokenizer


def build_tiny_qwen_image(path) -> str:
    """A random Qwen-Image-shaped pipeline: a two-layer Qwen2.5-VL (its language model reads the prompt in the chat
    template), a transformer of two blocks on 2 x 2-packed latents, the one-frame video VAE with a mean and std per
    latent channel (4 channels, 4x), and Qwen-Image's scheduler config (dynamic shifting, exponential, a terminal
    sigma of 0.02)."""
    torch.manual_seed(0)
    tokenizer = make_qwen_tokenizer(WORDS)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_theta=1e6, vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id,
                         rope_scaling=dict(mrope_section=[2, 2, 4], rope_type="default", type="default")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        vocab_size=len(tokenizer), vision_start_token_id=10**6, vision_end_token_id=10**6 + 1,
        image_token_id=10**6 + 2, video_token_id=10**6 + 3,
    )  # fmt: skip
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0],
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=16, max_image_seq_len=256,
        shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    pipeline = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(
        config).eval(), tokenizer=tokenizer, transformer=transformer)  # fmt: skip
    pipeline.save_pretrained(path)
    return str(path)


def build_tiny_clip(path) -> str:
    """A random CLIPModel (ViT vision tower at 224 px, patch 32) with its tokenizer and OpenAI-style image
    processor, in one folder: stands in for both openai/clip-vit-large-patch14 and PickScore."""
    torch.manual_seed(1)
    tokenizer = make_tokenizer(WORDS)
    config = CLIPConfig(
        text_config=text_config(tokenizer).to_dict(),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=32,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return str(path)


def build_aesthetic_head(path, dim: int = 32) -> str:
    """A random head in the layout of the LAION aesthetic predictor's .pth (keys layers.0 ... layers.7)."""
    torch.manual_seed(2)
    sizes = [(dim, 1024, 0), (1024, 128, 2), (128, 64, 4), (64, 16, 6), (16, 1, 7)]
    state_dict = {}
    for fan_in, fan_out, index in sizes:
        layer = torch.nn.Linear(fan_in, fan_out)
        state_dict[f"layers.{index}.weight"], state_dict[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    torch.save(state_dict, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session", params=["epsilon", "v_prediction"])
def tiny_sd_eps_or_v_path(request):
    """Runs a test on the epsilon model, then on its v-prediction twin."""
    return request.getfixturevalue("tiny_sd_path" if request.param == "epsilon" else "tiny_sd_v_path")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), dev=False)


@pytest.fixture(scope="session")
def tiny_qwen_image_path(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def aesthetic_head_path(tmp_path_factory):
    return build_aesthetic_head(tmp_path_factory.mktemp("head") / "aesthetic-model.pth")
