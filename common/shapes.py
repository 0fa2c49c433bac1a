"""The world of the tiny models (assets/tiny-sd, assets/tiny-sd3), not any method's idea: a 32 x 32 px image of one
shape (circle, square or triangle) in one colour on a plain background of another, captioned "a {colour} {shape} on a
{background} background" (the 90 prompts of common.prompts.PROMPT_SETS["shapes"]). `draw` makes the training images,
`random_captions` their captions, and `describe` reads any image back as the world's words (exact on drawn images), so
that `accuracy` measures how often samples follow their prompts."""

import math

import torch

from common.prompts import COLOURS, SHAPES

RGB = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.65, 0.2), "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.15), "white": (1.0, 1.0, 1.0), "black": (0.05, 0.05, 0.05),
}  # fmt: skip
PALETTE = torch.tensor([RGB[c] for c in COLOURS])  # (6, 3), in the order of COLOURS
MIN_SIZE, MAX_SIZE = 12, 22  # side of a shape's bounding box in pixels
FILL_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area over bounding box; triangles point up


def draw(shapes, colours, backgrounds, resolution: int = 32, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of shape SHAPES[shapes[i]] in COLOURS[colours[i]] on COLOURS[backgrounds[i]],
    at a random size and position, fully inside the image. Hard edges: a pixel is in if its centre is."""
    batch_size = len(shapes)
    size = torch.randint(MIN_SIZE, MAX_SIZE + 1, (batch_size,), generator=generator).view(-1, 1, 1)
    left = (torch.rand(batch_size, generator=generator).view(-1, 1, 1) * (resolution - size + 1)).floor()
    top = (torch.rand(batch_size, generator=generator).view(-1, 1, 1) * (resolution - size + 1)).floor()
    centres = torch.arange(resolution) + 0.5
    u = (centres.view(1, 1, -1) - left) / size  # (B, 1, W): 0 at the box's left edge, 1 at its right
    v = (centres.view(1, -1, 1) - top) / size  # (B, H, 1): 0 at the top, 1 at the bottom
    in_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    masks = torch.stack(
        [
            (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25,  # circle
            in_box,  # square
            in_box & ((u - 0.5).abs() < v / 2),  # triangle
        ]
    )  # (3, B, H, W)
    mask = masks[shapes, torch.arange(batch_size)].unsqueeze(1)  # (B, 1, H, W)
    return torch.where(mask, PALETTE[colours].view(-1, 3, 1, 1), PALETTE[backgrounds].view(-1, 3, 1, 1))


def random_captions(batch_size: int, generator=None):
    """Random (shape, colour, background) indices, background != colour, and their captions."""
    shapes = torch.randint(len(SHAPES), (batch_size,), generator=generator)
    colours = torch.randint(len(COLOURS), (batch_size,), generator=generator)
    offsets = torch.randint(1, len(COLOURS), (batch_size,), generator=generator)  # never the shape's colour
    backgrounds = (colours + offsets) % len(COLOURS)
    captions = [
        f"a {COLOURS[c]} {SHAPES[s]} on a {COLOURS[b]} background"
        for s, c, b in zip(shapes.tolist(), colours.tolist(), backgrounds.tolist())
    ]
    return shapes, colours, backgrounds, captions


def parse(prompt: str) -> dict:
    """'a red circle on a white background' -> {'colour': 'red', 'shape': 'circle', 'background': 'white'}."""
    words = prompt.split()
    return {"colour": words[1], "shape": words[2], "background": words[5]}


def describe(images) -> list[dict]:
    """Read each image (B, 3, H, W) in [0, 1] back as the world's words. Every pixel takes its nearest palette colour:
    the background is the most common one, the shape's colour the most common of the others. A pixel's share of the
    shape (where it lies between the two colours, in [0, 1]) keeps areas right where edges blur. In the bounding box of
    the shape's pixels (share > 1/2): a triangle has 1/4 of its area in the top half (a circle or a square 1/2), and
    a square fills the box's corners outside the inscribed circle (a circle does not). `fill` is area over box."""
    images = images.float().cpu()
    nearest = ((images.unsqueeze(1) - PALETTE.view(1, -1, 3, 1, 1)) ** 2).sum(2).argmin(1)  # (B, H, W)
    descriptions = []
    for image, pixels in zip(images, nearest):
        counts = torch.bincount(pixels.flatten(), minlength=len(COLOURS))
        background = int(counts.argmax())
        counts[background] = 0
        colour = int(counts.argmax())
        direction = (PALETTE[colour] - PALETTE[background]).view(3, 1, 1)
        share = (((image - PALETTE[background].view(3, 1, 1)) * direction).sum(0) / direction.pow(2).sum()).clamp(0, 1)
        rows, cols = (share > 0.5).any(1).nonzero(), (share > 0.5).any(0).nonzero()
        if counts[colour] == 0 or len(rows) < 2 or len(cols) < 2:
            descriptions.append({"colour": None, "shape": None, "background": COLOURS[background], "fill": 0.0})
            continue
        box = share[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # (h, w)
        height, width = box.shape
        top_share = box[: height // 2].sum() / (box[: height // 2].sum() + box[(height + 1) // 2 :].sum())
        v = ((torch.arange(height) + 0.5) / height).view(-1, 1)
        u = ((torch.arange(width) + 0.5) / width).view(1, -1)
        corners = box[(u - 0.5) ** 2 + (v - 0.5) ** 2 > 0.25].mean()
        shape = "triangle" if top_share < 0.375 else "square" if corners > 0.5 else "circle"
        words = {"colour": COLOURS[colour], "shape": shape, "background": COLOURS[background]}
        descriptions.append({**words, "fill": box.mean().item()})
    return descriptions


def accuracy(descriptions: list[dict], prompts: list[str]) -> dict:
    """Fraction of images whose shape colour, background colour, shape, and all three, match their prompt."""
    asked = [parse(p) for p in prompts]
    match = {k: [d[k] == a[k] for d, a in zip(descriptions, asked)] for k in ("colour", "background", "shape")}
    match["all"] = [all(m) for m in zip(*match.values())]
    return {k: sum(v) / len(v) for k, v in match.items()}
