"""Rewards: known values, gradients, the tiny-CLIP model rewards against the official CLIP processor and model."""

import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from common.reward_models import clip_preprocess
from common.rewards import REWARDS, jpeg_size_kb, make_reward
from scripts import LENGTH, SCRIPTS, TINY, definitions, read_metrics, run_script


def to_pil(images):
    return [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]


def smooth_images(batch, height, width, seed=0):
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, (height, width), mode="bilinear") * 255).round() / 255


@pytest.mark.parametrize("height, width", [(64, 64), (512, 512), (1024, 1024), (48, 80), (300, 200)])
def test_preprocessing_matches_the_clip_image_processor(height, width):
    """Stated tolerance, in normalised units (one uint8 level is 1/255/0.27 = 0.015): at most 0.02 everywhere on
    smooth images; on white noise a mean of 0.01, since PIL rounds and clips to uint8 between its two resize
    passes where bicubic overshoots."""
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    smooth = smooth_images(2, height, width)
    reference = processor(images=to_pil(smooth), return_tensors="pt").pixel_values
    assert clip_preprocess(smooth).shape == reference.shape == (2, 3, 224, 224)
    assert (clip_preprocess(smooth) - reference).abs().max() < 0.02
    noise = (torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    reference = processor(images=to_pil(noise), return_tensors="pt").pixel_values
    assert (clip_preprocess(noise) - reference).abs().mean() < 0.01


def test_jpeg_rewards_prefer_flat_images_and_are_not_differentiable():
    flat = torch.full((2, 3, 64, 64), 0.5)
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compressibility, incompressibility = make_reward("jpeg_compressibility"), make_reward("jpeg_incompressibility")
    assert (compressibility(flat, None) > compressibility(noise, None)).all()
    assert (incompressibility(noise, None) > incompressibility(flat, None)).all()
    torch.testing.assert_close(compressibility(noise, None), -incompressibility(noise, None))
    import io

    buffer = io.BytesIO()
    to_pil(noise[:1])[0].save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(noise[:1]).item() == pytest.approx(len(buffer.getvalue()) / 1000)
    assert not compressibility.differentiable and not incompressibility.differentiable


def colorfulness_numpy(image):
    """Hasler and Suesstrunk's metric, written independently on one H x W x 3 uint8-scale array."""
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)


def test_colorfulness_values_and_gradient():
    reward = make_reward("colorfulness")
    grey = torch.full((1, 3, 16, 16), 0.4)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    assert reward(grey, None).item() == pytest.approx(0.0, abs=1e-3)
    assert reward(red, None).item() == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-5)  # 85.5
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = [colorfulness_numpy(x.permute(1, 2, 0).numpy() * 255) for x in images]
    torch.testing.assert_close(reward(images, None), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-3)
    images.requires_grad_()
    reward(images, None).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_aesthetic_through_tiny_clip(tiny_clip_path, aesthetic_head_path):
    reward = make_reward("aesthetic", clip_model=tiny_clip_path, head=aesthetic_head_path)
    images = smooth_images(2, 64, 64)
    # the same score from the official processor and the full CLIPModel, with the head's weights by hand
    clip = CLIPModel.from_pretrained(tiny_clip_path)
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_path)(images=to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=pixels).pooler_output
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        state_dict = torch.load(aesthetic_head_path)
        for index in (0, 2, 4, 6, 7):  # dropout is off in eval mode and there are no activations
            x = x @ state_dict[f"layers.{index}.weight"].T + state_dict[f"layers.{index}.bias"]
        torch.testing.assert_close(reward(images, None), x.squeeze(-1), rtol=1e-3, atol=1e-3)
    images.requires_grad_()
    reward(images, None).sum().backward()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_pickscore_through_tiny_clip(tiny_clip_path):
    reward = make_reward("pickscore", model=tiny_clip_path, processor=tiny_clip_path)
    images, prompts = smooth_images(2, 64, 64), ["a photo of a cat", "a dog"]
    clip = CLIPModel.from_pretrained(tiny_clip_path)
    from transformers import CLIPProcessor

    inputs = CLIPProcessor.from_pretrained(tiny_clip_path)(text=prompts, images=to_pil(images), padding=True,
                                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        scores = reward(images, prompts)
        logits = clip(**inputs).logits_per_image  # logit_scale.exp() * cosine, (images, texts)
        torch.testing.assert_close(scores, logits.diagonal(), rtol=0, atol=0.05)  # uint8 vs float preprocessing
        inputs["pixel_values"] = clip_preprocess(images)  # the same pixels: then the score formula is exact
        torch.testing.assert_close(scores, clip(**inputs).logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    images.requires_grad_()
    reward(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


def test_clipscore_through_tiny_clip(tiny_clip_path):
    """2.5 * max(cosine, 0) of the image's and the prefixed caption's CLIP embeddings, computed here by hand."""
    reward = make_reward("clipscore", model=tiny_clip_path)
    images = smooth_images(6, 64, 48)
    prompts = ["a photo of a cat", "a dog", "a red circle", "a blue square", "a cat", "a green dog"]
    clip, tokenizer = CLIPModel.from_pretrained(tiny_clip_path), AutoTokenizer.from_pretrained(tiny_clip_path)
    text = tokenizer(["A photo depicts " + p for p in prompts], padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = clip.get_image_features(pixel_values=clip_preprocess(images)).pooler_output
        text_embeds = clip.get_text_features(**text).pooler_output
        cosine = (image_embeds / image_embeds.norm(dim=-1, keepdim=True) * text_embeds / text_embeds.norm(dim=-1,
                  keepdim=True)).sum(-1)  # fmt: skip
        scores = reward(images, prompts)
    assert (cosine > 0).any() and (cosine < 0).any(), cosine  # both branches of the max
    torch.testing.assert_close(scores, torch.where(cosine > 0, 2.5 * cosine, torch.zeros_like(cosine)))
    images.requires_grad_()
    reward(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


class StandInOpenClip:
    """What HPSv2 uses of open_clip, small: create_model (a module with encode_image and encode_text, its weights
    loaded from the checkpoint) and get_tokenizer (letters to ids, 8 a prompt)."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Linear(3 * 224 * 224, 8)
            self.text = torch.nn.Embedding(128, 8)

        def encode_image(self, pixels, normalize=False):
            embeds = self.image(pixels.flatten(1))
            return F.normalize(embeds, dim=-1) if normalize else embeds

        def encode_text(self, ids, normalize=False):
            embeds = self.text(ids).mean(1)
            return F.normalize(embeds, dim=-1) if normalize else embeds

    @staticmethod
    def create_model(name, pretrained=None):
        assert name == "ViT-H-14" and pretrained is None
        return StandInOpenClip.Model()

    @staticmethod
    def get_tokenizer(name):
        return lambda prompts: torch.tensor([[ord(c) % 128 for c in (p + " " * 8)[:8]] for p in prompts])


@pytest.mark.parametrize("name, filename", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_hpsv2_and_hpsv21_read_their_checkpoints_and_score_the_cosine(name, filename, tmp_path, monkeypatch):
    """On a stand-in for open_clip (which needs torchvision, with no CPU build here): each version downloads its own
    checkpoint file from xswu/HPSv2 and scores cosine(image, text) of CLIP-preprocessed images, computed by hand."""
    import sys

    import common.reward_models

    torch.manual_seed(0)
    weights = StandInOpenClip.Model()
    torch.save({"state_dict": weights.state_dict()}, tmp_path / filename)
    asked = []
    monkeypatch.setitem(sys.modules, "open_clip", StandInOpenClip)
    monkeypatch.setattr(
        common.reward_models, "hub_file", lambda repo, file: asked.append((repo, file)) or str(tmp_path / file)
    )
    reward = make_reward(name)
    assert asked[-1] == ("xswu/HPSv2", filename)
    images, prompts = smooth_images(2, 64, 64), ["a cat", "a dog"]
    with torch.no_grad():
        expected = F.cosine_similarity(weights.encode_image(clip_preprocess(images)),
                                       weights.encode_text(StandInOpenClip.get_tokenizer("")(prompts)))  # fmt: skip
        torch.testing.assert_close(reward(images, prompts), expected)
    images.requires_grad_()
    reward(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


def test_unknown_reward_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_reward("beauty")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "unknown reward 'beauty'" in message and all(name in message for name in REWARDS)


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hpsv2_says_how_to_install_open_clip(name, capsys):
    try:
        import open_clip  # noqa: F401

        pytest.skip("open_clip is installed")
    except ImportError:
        pass
    with pytest.raises(SystemExit):
        make_reward(name)
    assert f"the {name} reward needs open_clip: pip install open-clip-torch" in capsys.readouterr().err


def test_missing_reward_model_gives_one_clear_sentence(capsys):
    with pytest.raises(SystemExit):
        make_reward("aesthetic", clip_model="/no/such/clip")
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: could not load '/no/such/clip'") and len(message.splitlines()) == 1


def test_each_script_offers_exactly_the_rewards_it_can_use():
    """--reward's choices (what --help lists): DRaFT backpropagates through the reward, so only the differentiable
    ones; DDPO and RWR any; BRAID's labeler any. Each also takes a string (a file's reward, a weighted sum)."""
    for script in SCRIPTS:
        fields = typing.get_type_hints(definitions(script)["Args"])
        literal, other = typing.get_args(fields["labeler" if script == "braid.py" else "reward"])
        choices = typing.get_args(literal)
        assert other is str
        differentiable_only = script.startswith("draft")
        assert set(choices) == {name for name, cls in REWARDS.items() if cls.differentiable or not differentiable_only}


USER_REWARDS = """
import torch

class Redness(torch.nn.Module):
    differentiable = True

    def forward(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def brightness_bucket(images, prompts):  # not differentiable: no attribute
    return (images.mean(dim=(1, 2, 3)) * 10).round()


def wrong_shape(images, prompts):
    return images.mean()
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return str(path)


def test_your_own_reward_from_a_file_and_weighted_sums(reward_file, capsys):
    redness = make_reward(f"{reward_file}:Redness", differentiable=True)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
    torch.testing.assert_close(redness(images, ["a"] * 3), expected)
    total = make_reward(f"colorfulness+0.5*{reward_file}:Redness", differentiable=True)
    value = total(images, ["a"] * 3)
    torch.testing.assert_close(value, make_reward("colorfulness")(images) + 0.5 * expected)
    value.sum().backward()
    assert images.grad.abs().sum() > 0 and set(total.last) == {"colorfulness", f"{reward_file}:Redness"}
    assert not make_reward(f"{reward_file}:brightness_bucket").differentiable
    for spec, message in [
        (f"{reward_file}:brightness_bucket", "is not differentiable (a file's reward says it is with an attribute"),
        (f"{reward_file}:wrong_shape", "must return a float tensor (B,) for images (B, 3, H, W), got torch.float32 of"),
        (f"{reward_file}:missing", "has no class or function named 'missing'"),
        ("/no/such/file.py:Fn", "the reward file '/no/such/file.py' does not exist"),
        ("colorfulness+x*jpeg_compressibility", "the reward weight 'x' in"),
        ("colorfulness+beauty", "unknown reward 'beauty'; choose one of: aesthetic"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            make_reward(spec, differentiable=True)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, spec


@pytest.mark.parametrize("script, spec, differentiable", [
    ("draft_k.py", "Redness", True), pytest.param("ddpo.py", "brightness_bucket", False, marks=pytest.mark.slow),
    pytest.param("ddpo.py", "Redness", True, marks=pytest.mark.slow),
])  # fmt: skip
def test_a_reward_file_runs_through_draft_and_ddpo(script, spec, differentiable, reward_file, tiny_sd_path, tmp_path,
                                                   monkeypatch):  # fmt: skip
    args = ["--pretrained-model", tiny_sd_path, *TINY[script], "--reward", f"{reward_file}:{spec}+0.01*colorfulness",
            LENGTH[script], "1", "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    run_script(script, args, monkeypatch)
    _, (metrics,) = read_metrics(tmp_path / "runs")
    assert {f"eval_{reward_file}:{spec}_mean", "eval_colorfulness_mean"} <= set(metrics)  # each part logged apart
    parts = metrics[f"eval_{reward_file}:{spec}_mean"] + 0.01 * metrics["eval_colorfulness_mean"]
    assert metrics["eval_reward_mean"] == pytest.approx(parts, rel=1e-4)


def test_draft_refuses_a_reward_file_without_a_gradient(reward_file, tiny_sd_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script("draft_lv.py", ["--pretrained-model", tiny_sd_path, *TINY["draft_lv.py"], "--reward",
                                   f"{reward_file}:brightness_bucket"], monkeypatch)  # fmt: skip
    assert exit_info.value.code == 2 and "is not differentiable" in capsys.readouterr().err
