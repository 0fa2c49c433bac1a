"""Your own reward, as `--reward examples/redness_reward.py:redness`: a function (or a class built without
arguments) of (images, prompts), images (B, 3, H, W) in [0, 1], returning one float per image."""

import torch


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    red, green, blue = images.unbind(dim=1)  # each (B, H, W)
    return (red - (green + blue) / 2).mean(dim=(1, 2))  # (B,): how much redder than the rest each image is


redness.differentiable = True  # torch all the way: DRaFT and BRAID may backpropagate through it
