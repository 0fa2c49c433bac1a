"""ImageReward on a tiny random checkpoint in the published layout (ImageReward.pt's tensor names, BLIP's ViT and its
BERT with cross-attention, the MLP head): the project's loader and transformers' BLIP modules against the reference's
computation written out here with plain tensor operations, from the same tensors."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer

from common.reward_models import ImageReward, clip_preprocess
from common.rewards import make_reward

WIDTH, DEPTH, PATCH = 32, 2, 16  # the ViT: 16 heads (ImageReward's ViT-L), so 2 channels a head here
HIDDEN, LAYERS, HEADS, INNER = 24, 2, 4, 40  # the BERT
WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] a an photo of red blue green circle square cat dog on white background".split()


def random_checkpoint(vocab: int, positions: int) -> dict:
    """Random tensors under ImageReward.pt's names, with BLIP's unused projections and position ids among them."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {"blip.vision_proj.weight": rand(8, WIDTH), "blip.text_proj.weight": rand(8, HIDDEN)}
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state |= {v + "cls_token": rand(1, 1, WIDTH), v + "pos_embed": rand(1, (224 // PATCH) ** 2 + 1, WIDTH),
              v + "patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.05),
              v + "patch_embed.proj.bias": rand(WIDTH)}  # fmt: skip

    def linear(name, fan_in, fan_out):
        state[name + ".weight"], state[name + ".bias"] = rand(fan_out, fan_in, scale=fan_in**-0.5), rand(fan_out)

    def norm(name, dim):
        state[name + ".weight"], state[name + ".bias"] = 1 + rand(dim, scale=0.1), rand(dim, scale=0.1)

    for i in range(DEPTH):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", WIDTH), linear(b + "attn.qkv", WIDTH, 3 * WIDTH), linear(b + "attn.proj", WIDTH, WIDTH)
        norm(b + "norm2", WIDTH), linear(b + "mlp.fc1", WIDTH, 4 * WIDTH), linear(b + "mlp.fc2", 4 * WIDTH, WIDTH)
    norm(v + "norm", WIDTH)
    state[t + "embeddings.position_ids"] = torch.arange(positions)[None]
    state[t + "embeddings.word_embeddings.weight"] = rand(vocab, HIDDEN)
    state[t + "embeddings.position_embeddings.weight"] = rand(positions, HIDDEN)
    norm(t + "embeddings.LayerNorm", HIDDEN)
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        for kind, source in (("attention", HIDDEN), ("crossattention", WIDTH)):
            linear(b + kind + ".self.query", HIDDEN, HIDDEN)
            linear(b + kind + ".self.key", source, HIDDEN), linear(b + kind + ".self.value", source, HIDDEN)
            linear(b + kind + ".output.dense", HIDDEN, HIDDEN), norm(b + kind + ".output.LayerNorm", HIDDEN)
        linear(b + "intermediate.dense", HIDDEN, INNER), linear(b + "output.dense", INNER, HIDDEN)
        norm(b + "output.LayerNorm", HIDDEN)
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((HIDDEN, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        linear(f"mlp.layers.{index}", fan_in, fan_out)
    return state


@pytest.fixture(scope="module")
def imagereward_folder(tmp_path_factory):
    """ImageReward.pt, med_config.json (BLIP's keys, the tiny sizes) and a BERT tokenizer built in code."""
    folder = tmp_path_factory.mktemp("tiny-imagereward")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=HIDDEN, initializer_range=0.02, intermediate_size=INNER,
               layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert", num_attention_heads=HEADS,
               num_hidden_layers=LAYERS, pad_token_id=0, type_vocab_size=2, vocab_size=len(WORDS),
               encoder_width=768, add_cross_attention=True)  # fmt: skip
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.save(random_checkpoint(len(WORDS), 40), folder / "ImageReward.pt")
    return folder


def reference_score(state, pixels, ids, mask):
    """ImageReward's score as its code computes it (timm's ViT, BLIP's BERT with cross-attention, the head, then
    (r - mean) / std), in plain operations on the checkpoint's tensors."""

    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def attend(q, k, v, heads, bias=0.0):
        (batch, length, dim), size = q.shape, q.shape[-1] // heads
        q, k, v = (x.reshape(batch, -1, heads, size).transpose(1, 2) for x in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * size**-0.5 + bias).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(batch, length, dim)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state[v + "cls_token"].expand(len(x), 1, WIDTH), x.flatten(2).transpose(1, 2)], 1)
    x = x + state[v + "pos_embed"]
    for i in range(DEPTH):
        b = f"{v}blocks.{i}."
        q, k, value = lin(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, value, 16), b + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)
    y = state[t + "embeddings.word_embeddings.weight"][ids]
    y = norm(y + state[t + "embeddings.position_embeddings.weight"][: ids.shape[1]], t + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        for kind, source, bias in (("attention", None, padding), ("crossattention", image, 0.0)):
            s = f"{b}{kind}.self."
            keys = y if source is None else source
            out = attend(lin(y, s + "query"), lin(keys, s + "key"), lin(keys, s + "value"), HEADS, bias)
            y = norm(lin(out, f"{b}{kind}.output.dense") + y, f"{b}{kind}.output.LayerNorm", 1e-12)
        y = norm(lin(F.gelu(lin(y, b + "intermediate.dense")), b + "output.dense") + y, b + "output.LayerNorm", 1e-12)
    z = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{index}")
    return (z.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_reads_the_published_layout_and_scores_as_its_code_does(imagereward_folder):
    """Through `--reward imagereward:FOLDER`: the score of each (image, prompt) equals the reference's, for images of
    other sizes than 224 (CLIP's resize and crop, as ImageReward's transform) and a prompt longer than its 35 tokens;
    the score carries a gradient back to the images (DRaFT may use it)."""
    reward = make_reward(f"imagereward:{imagereward_folder}")
    state = torch.load(imagereward_folder / "ImageReward.pt")
    images = torch.rand(4, 3, 96, 80, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle on a white background", "a photo of a cat", "a dog", " ".join(["a blue square"] * 15)]
    text = BertTokenizer.from_pretrained(imagereward_folder)(prompts, padding="max_length", truncation=True,
                                                             max_length=35, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = reference_score(state, clip_preprocess(images), text.input_ids, text.attention_mask)
        scores = reward(images, prompts)
    assert expected.std() > 0.1  # the images and prompts are told apart
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    images.requires_grad_()
    reward(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


def test_imagereward_names_what_a_wrong_checkpoint_lacks(imagereward_folder, tmp_path, capsys):
    for name in ("vocab.txt", "tokenizer_config.json", "med_config.json"):
        (tmp_path / name).write_bytes((imagereward_folder / name).read_bytes())
    state = torch.load(imagereward_folder / "ImageReward.pt")
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(SystemExit) as exit_info:
        ImageReward(str(tmp_path), tokenizer=str(tmp_path))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "lacks ImageReward's blip.text_encoder tensor encoder.layer.1.crossattention.self.key.weight" in message
    assert len(message.splitlines()) == 1


def test_imagereward_refuses_a_file_that_is_not_its_checkpoint(imagereward_folder, tmp_path, capsys):
    for name in ("vocab.txt", "tokenizer_config.json", "med_config.json"):
        (tmp_path / name).write_bytes((imagereward_folder / name).read_bytes())
    (tmp_path / "ImageReward.pt").write_bytes(b"<html>not found</html>")  # what a failed download can leave
    with pytest.raises(SystemExit) as exit_info:
        ImageReward(str(tmp_path), tokenizer=str(tmp_path))
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(message.splitlines()) == 1
    assert message.startswith(f"error: cannot read ImageReward's '{tmp_path / 'ImageReward.pt'}'"), message
