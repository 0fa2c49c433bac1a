"""A reward served over HTTP (`--reward http://HOST:PORT/PATH`), and the protocol that reward_server.py serves.

The protocol, JSON both ways, no pickle (a reply can only be data, never code run in the trainer):
    request   POST {"prompts": [str, ...], "images": [str, ...]}   one image per prompt: base64 of an 8-bit RGB PNG
    reply     200  {"rewards": [float, ...]}                       one finite number per image, in the same order;
                                                                   other keys are ignored, or logged when they are
                                                                   lists of numbers of the same length
    a refusal 4xx  {"error": "what was wrong with the request"}    (5xx: the server's own fault)
"""

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from torch import nn

from common.cli import fail, where_to_resume

TRANSIENT = (429, 502, 503, 504)  # HTTP statuses worth retrying: busy, or a proxy between us and a restarting server


def png_base64(image: torch.Tensor) -> str:
    """An image (3, H, W) in [0, 1] as the protocol sends it: rounded to 8 bits, a PNG, base64 text."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_from_base64(text: str, max_pixels: int) -> torch.Tensor:
    """The protocol's image back as (3, H, W) in [0, 1]; ValueError with the reason if it is not a PNG (or is larger
    than `max_pixels`, checked before the pixels are decoded)."""
    from PIL import Image

    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError("is not base64 text") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise ValueError
        if image.width * image.height > max_pixels:
            raise ValueError(f"has {image.width} x {image.height} pixels, more than the server's {max_pixels}")
        pixels = np.asarray(image.convert("RGB"))
    except ValueError as e:
        raise ValueError(str(e) or "is not a PNG image") from None
    except Exception:  # PIL's errors for truncated or corrupt data
        raise ValueError("is not a PNG image that can be decoded") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class HttpReward(nn.Module):
    """The reward a server computes (the protocol above): one POST per call, with the images as 8-bit PNGs. A
    connection that fails, a timeout, or a busy server (429, 502-504) is retried `retries` times, waiting `backoff`,
    2 `backoff`, 4 `backoff`... seconds; anything else wrong ends the run with one sentence saying what, and where
    the last checkpoint is. No gradient: DRaFT refuses it. `extras`: the reply's other lists of numbers, by key."""

    differentiable = False
    timeout = 300.0  # seconds a reply may take (a judge model on a busy GPU can be slow)
    retries = 4
    backoff = 1.0

    def __init__(self, url: str):
        super().__init__()
        self.url, self.extras = url, {}

    def forward(self, images, prompts=None):
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        body = json.dumps({"prompts": prompts, "images": [png_base64(image) for image in images]}).encode()
        reply = self.post(body)
        try:
            answer = json.loads(reply)
        except (ValueError, UnicodeDecodeError):
            self.refuse(f"answered with a body that is not JSON ({reply[:80]!r})")
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or not all(is_number(r) for r in rewards):
            self.refuse(f'answered without a list of numbers under "rewards" ({str(answer)[:80]})')
        if len(rewards) != len(images):
            self.refuse(f"answered {len(rewards)} rewards for {len(images)} images")
        bad = [r for r in rewards if not math.isfinite(r)]
        if bad:
            self.refuse(f"answered {bad[0]} for an image, not a finite number")
        self.extras = {
            key: torch.tensor(value, dtype=torch.float32)
            for key, value in answer.items()
            if key != "rewards" and isinstance(value, list) and len(value) == len(images) and all(map(is_number, value))
        }
        return torch.tensor(rewards, dtype=torch.float32, device=images.device)

    def post(self, body: bytes) -> bytes:
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:  # the server answered, with an error status
                if e.code in TRANSIENT and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                self.refuse(f"answered HTTP {e.code} ({served_error(e)})")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # no answer: refused, timed out
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                reason = getattr(e, "reason", None) or e
                self.refuse(f"cannot be reached after {self.retries + 1} tries ({reason})")
        raise AssertionError("unreachable")

    def refuse(self, what: str):
        fail(f"the reward server {self.url} {what}{where_to_resume()}")


def served_error(e: urllib.error.HTTPError) -> str:
    """What an error reply says: its JSON "error", else the start of its body, else the status's reason."""
    try:
        body = e.read()[:2000]
    except OSError:
        body = b""
    try:
        return str(json.loads(body)["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:200] or str(e.reason)
