"""The rewards that are models: the CLIP-based ones (aesthetic, PickScore, CLIPScore, HPS v2 and v2.1) and ImageReward,
with the differentiable preprocessing they share. Each takes its model ids or local paths as arguments, so that tests
pass tiny random models built in code through the same code; common/rewards.py names them and checks every call."""

import json
import os

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from common.cli import fail, load_or_fail

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing: resize the short side to `size` (bicubic, antialiased), centre crop,
    normalise. Matches CLIPImageProcessor on the same image up to its uint8 rounding (tests/test_rewards.py)."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, int(height * scale)), max(size, int(width * scale))
    images = F.interpolate(images, (new_height, new_width), mode="bicubic", antialias=True, align_corners=False)
    images = images.clamp(0, 1)  # bicubic overshoots; PIL clips it to the uint8 range
    top, left = (new_height - size) // 2, (new_width - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (mean, std))
    return (images - mean) / std


def processor_preprocess(processor, images) -> torch.Tensor:
    """clip_preprocess with the size, mean and std of a model's own image processor config."""
    size = processor.crop_size["height"] if processor.do_center_crop else processor.size["shortest_edge"]
    return clip_preprocess(images, size, processor.image_mean, processor.image_std)


def hub_file(repo_or_path: str, filename: str) -> str:
    """A local file as is, else `filename` downloaded from the hub repo `repo_or_path`."""
    return (
        repo_or_path if os.path.isfile(repo_or_path) else load_or_fail(hf_hub_download, repo_or_path, filename=filename)
    )


class ClipImageFeatures(nn.Module):
    """L2-normalised CLIP image embeddings, differentiable: what the aesthetic predictor (and BRAID's reward model)
    reads. `clip_model` is a hub id or local folder of a transformers CLIPModel with its image processor."""

    def __init__(self, clip_model="openai/clip-vit-large-patch14"):
        super().__init__()
        from transformers import CLIPImageProcessor  # imported here: its import warns when torchvision is missing

        self.clip = load_or_fail(CLIPModel.from_pretrained, clip_model)  # the text tower idles: 1/4 of the weights
        self.processor = load_or_fail(CLIPImageProcessor.from_pretrained, clip_model)

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, projection_dim), in the CLIP model's dtype
        pixels = processor_preprocess(self.processor, images).to(self.clip.dtype)
        embeds = self.clip.get_image_features(pixel_values=pixels).pooler_output
        return embeds / embeds.norm(dim=-1, keepdim=True)


class ImageFeatures(nn.Module):
    """Frozen, differentiable image features for a reward model fitted on them (BRAID's): ClipImageFeatures of a CLIP
    id or path, or "vae": the text-to-image `model`'s own VAE latents average-pooled to 4 x 4 (no extra download)."""

    def __init__(self, feature_model: str, model):
        super().__init__()
        self.vae = model.vae if feature_model == "vae" else None  # a submodule: its device is the features'
        self.encode_images = model.encode_images
        self.clip = ClipImageFeatures(feature_model).requires_grad_(False).eval() if self.vae is None else None

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, D)
        if self.clip is not None:
            return self.clip(images).float()
        return F.adaptive_avg_pool2d(self.encode_images(images), 4).flatten(1)  # (B, C * 16)


def mlp_head(dim: int) -> nn.Sequential:
    """The head of the LAION aesthetic predictor, which ImageReward took over: dim-1024-128-64-16-1 with dropouts and
    no activations (in eval mode an affine map, trained as an MLP)."""
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class Aesthetic(nn.Module):
    """LAION 'improved aesthetic predictor': L2-normalised CLIP ViT-L/14 image embeddings into an MLP head
    (768-1024-128-64-16-1, dropouts, no activations), weights sac+logos+ava1-l14-linearMSE."""

    differentiable = True

    def __init__(self, clip_model="openai/clip-vit-large-patch14", head="trl-lib/ddpo-aesthetic-predictor"):
        super().__init__()
        self.features = ClipImageFeatures(clip_model)
        dim = self.features.clip.config.projection_dim
        self.head = mlp_head(dim)
        state_dict = torch.load(hub_file(head, "aesthetic-model.pth"), map_location="cpu", weights_only=True)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state_dict.items()})

    def forward(self, images, prompts=None):
        embeds = self.features(images)
        return self.head(embeds.to(self.head[0].weight.dtype)).squeeze(-1).float()


class PickScore(nn.Module):
    """PickScore (Kirstain et al., 2023): logit_scale.exp() * cosine(image, text) of a fine-tuned CLIP-H."""

    differentiable = True

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        super().__init__()
        from transformers import CLIPImageProcessor  # imported here: its import warns when torchvision is missing

        self.model = load_or_fail(CLIPModel.from_pretrained, model)
        self.processor = load_or_fail(CLIPImageProcessor.from_pretrained, processor)
        self.tokenizer = load_or_fail(AutoTokenizer.from_pretrained, processor)

    def cosine(self, images, texts) -> torch.Tensor:
        """(B,) cosine of each image's and its text's embeddings, in fp32; texts truncated to 77 tokens."""
        pixels = processor_preprocess(self.processor, images).to(self.model.dtype)
        text = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        text_embeds = self.model.get_text_features(**text.to(images.device)).pooler_output.float()
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)

    def forward(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class ClipScore(PickScore):
    """CLIPScore (Hessel et al., 2021): 2.5 * max(cosine(image, text), 0) with CLIP ViT-B/32, the caption prefixed
    with "A photo depicts" as in the paper's code; text-image alignment without a reference, in [0, 2.5]. (The
    torchmetrics CLIPScore is 100 * max(cosine, 0), without the prefix, and ViT-L/14 by default.)"""

    prefix = "A photo depicts "

    def __init__(self, model="openai/clip-vit-base-patch32"):
        super().__init__(model, processor=model)

    def forward(self, images, prompts):
        return 2.5 * self.cosine(images, [self.prefix + p for p in prompts]).clamp(min=0)


class HPSv2(nn.Module):
    """HPS v2 (Wu et al., 2023): cosine(image, text) of an open_clip ViT-H-14 fine-tuned on human preferences
    (papers report it x100); `version` "2.1" is the newer checkpoint of the same model (HPS_v2.1_compressed.pt).
    Needs the optional open_clip package. The tests run it on a stand-in for open_clip: open_clip itself needs
    torchvision, which has no CPU build on PyPI (its ViT-H-14 is unverified here)."""

    differentiable = True

    def __init__(self, checkpoint="xswu/HPSv2", version="2.0"):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            fail(
                f"the {'hpsv2' if version == '2.0' else 'hpsv2.1'} reward needs open_clip: pip install open-clip-torch"
            )
        self.model = open_clip.create_model("ViT-H-14", pretrained=None)
        filename = "HPS_v2_compressed.pt" if version == "2.0" else "HPS_v2.1_compressed.pt"
        state = torch.load(hub_file(checkpoint, filename), map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["state_dict"])
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def forward(self, images, prompts):
        dtype = next(self.model.parameters()).dtype
        image_embeds = self.model.encode_image(clip_preprocess(images).to(dtype), normalize=True)
        text_embeds = self.model.encode_text(self.tokenizer(prompts).to(images.device), normalize=True)
        return (image_embeds * text_embeds).sum(-1).float()


class HPSv21(HPSv2):
    """HPS v2.1: HPS v2's model and formula with the newer checkpoint its authors released (v2.1)."""

    def __init__(self, checkpoint="xswu/HPSv2"):
        super().__init__(checkpoint, version="2.1")


# ImageReward.pt's names for the ViT's tensors (BLIP's timm-style ViT), part by part, in transformers' BlipVisionModel
VISION_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                "patch_embed": "embeddings", "norm": "post_layernorm", "blocks": "encoder.layers",
                "norm1": "layer_norm1", "norm2": "layer_norm2", "attn": "self_attn", "proj": "projection"}  # fmt: skip
MED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")  # fmt: skip


def vision_name(key: str) -> str:
    """A tensor's name in ImageReward.pt's ViT -> its name in BlipVisionModel (the patch embedding's proj is a conv)."""
    key = key.replace("patch_embed.proj.", "patch_embed.patch_embedding.")
    return ".".join(VISION_NAMES.get(part, part) for part in key.split("."))


class ImageReward(nn.Module):
    """ImageReward (Xu et al., 2023), a model of human preference for text-to-image: BLIP's ViT-L/16 reads the image
    (224 px, CLIP's normalisation), a BERT encoder reads the prompt (35 tokens) and attends to the image's tokens, and
    its first ([CLS]) state goes through an MLP head, standardised by the mean and std of the authors' training set.
    The published checkpoint (THUDM/ImageReward: ImageReward.pt, med_config.json) is laid out for the BLIP code the
    authors ship; it is read here into transformers' BLIP vision and text modules (VISION_NAMES renames the ViT's
    tensors; the text encoder's keep their names). `checkpoint`: that hub repo or a local folder with both files;
    `vision_heads`: the ViT-L's 16, which the checkpoint does not store. Tested on a tiny random checkpoint in that
    layout against the reference's computation written out by hand; the real 1.7 GB file is not loaded here."""

    differentiable = True
    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, checkpoint="THUDM/ImageReward", tokenizer="bert-base-uncased", vision_heads: int = 16):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        def file(name):
            return os.path.join(checkpoint, name) if os.path.isdir(checkpoint) else hub_file(checkpoint, name)

        path, config = file("ImageReward.pt"), file("med_config.json")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs on loading
            with open(config) as f:
                med = json.load(f)
        except Exception as e:  # a truncated download, another kind of file
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            fail(f"cannot read ImageReward's '{path}' and '{config}' ({reason})")
        if not isinstance(state, dict) or not isinstance(med, dict) or not set(MED_KEYS) <= set(med):
            fail(f"'{path}' and '{config}' are not ImageReward's state dict and BERT config (THUDM/ImageReward)")
        parts = {prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
                 for prefix in ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")}  # fmt: skip
        vision = {vision_name(k): v for k, v in parts.pop("blip.visual_encoder.").items()}
        shapes = ("embeddings.position_embedding", "embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.bias")
        if not all(key in vision for key in shapes):  # what the ViT's size is read from
            fail(f"'{path}' is not an ImageReward checkpoint: it lacks blip.visual_encoder's embeddings or blocks")
        positions, width = vision["embeddings.position_embedding"].shape[1:]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=len(vision["encoder.layers.0.mlp.fc1.bias"]), patch_size=patch,
            image_size=round((positions - 1) ** 0.5) * patch, num_attention_heads=vision_heads, hidden_act="gelu",
            num_hidden_layers=sum(k.endswith(".layer_norm1.bias") for k in vision), layer_norm_eps=1e-6))  # fmt: skip
        text_config = BlipTextConfig(**{k: med[k] for k in MED_KEYS}, encoder_hidden_size=width, is_decoder=True)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)  # is_decoder builds the cross-attention
        self.head = mlp_head(self.text.config.hidden_size)
        for module, weights, prefix in ((self.vision, vision, "blip.visual_encoder"),
                                        (self.text, parts["blip.text_encoder."], "blip.text_encoder"),
                                        (self.head, parts["mlp.layers."], "mlp.layers")):  # fmt: skip
            for key, tensor in module.state_dict().items():
                if key not in weights or weights[key].shape != tensor.shape:
                    fail(f"'{path}' lacks ImageReward's {prefix} tensor {key} of shape {tuple(tensor.shape)}: "
                         "the published checkpoint is ImageReward.pt of THUDM/ImageReward")  # fmt: skip
            module.load_state_dict({k: weights[k] for k in module.state_dict()})  # the rest (BLIP's projections) unused
        self.tokenizer = load_or_fail(AutoTokenizer.from_pretrained, tokenizer)  # BLIP's [DEC], [ENC]: not in prompts

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.vision.config.image_size).to(self.vision.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        # is_decoder=False (the default): the prompt's tokens see each other both ways; they see every image token
        states = self.text(text.input_ids.to(images.device), text.attention_mask.to(images.device),
                           encoder_hidden_states=image_tokens).last_hidden_state  # fmt: skip
        score = self.head(states[:, 0].to(self.head[0].weight.dtype)).squeeze(-1).float()
        return (score - self.mean) / self.std
