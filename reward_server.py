"""A reward server: any of the project's rewards, or your own path.py:Name, served over HTTP to the training scripts.

    python reward_server.py --reward aesthetic --port 8000             # on the machine with the reward's GPU
    python ddpo.py --reward http://gpu-box:8000/                       # anywhere that can reach it

The protocol (common/remote.py), JSON both ways and no pickle, so that neither side runs code the other sends:
    POST {"prompts": [str, ...], "images": [base64 PNG, ...]}  ->  200 {"rewards": [float, ...]}
A request that is not that (not JSON, missing or mistyped keys, counts that differ, an image that is not a PNG or is
too large, images of different sizes, too many images or pixels, too large a body) is answered 400 or 413 with
{"error": "..."} and the server goes on; a reward that fails on a request is answered 500 with its sentence. GET
answers what is served. Each request is scored as one batch, one at a time, on this machine's device (--no-cuda: the
CPU).

Python's own http.server, threaded: no dependency to install, and enough for what it carries (one trainer, or a few,
sending a batch of images every few seconds); behind a proxy or for many clients, put it behind a real web server.
"""

import common.startup  # noqa: F401  (first: Ctrl-C while the libraries load ends in one line)

# isort: split
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import tyro

from common.cli import fail, install_error_handling
from common.remote import image_from_base64
from common.rewards import make_reward


@dataclass
class Args:
    reward: str = "aesthetic"
    """the reward to serve: a name (aesthetic, pickscore, hpsv2, ...), your own path.py:Name, or a weighted sum"""
    host: str = "127.0.0.1"
    """the address to listen on (0.0.0.0: every interface, so that other machines can reach it)"""
    port: int = 8000
    """the port (0: any free one; the address is printed)"""
    cuda: bool = True
    """score on a CUDA device when there is one"""
    max_images: int = 512
    """the most images one request may carry"""
    max_pixels: int = 4096 * 4096
    """the most pixels one image may have"""
    max_request_pixels: int = 2**27
    """the most pixels of one request's images in all (2**27: 128 images of 1024 x 1024, 1.5 GB once decoded)"""
    max_body_mb: int = 1024
    """the largest request body in MiB (the PNGs, as base64)"""


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_request(body: bytes, max_images: int, max_pixels: int, max_request_pixels: int = 2**27):
    """The request's images (B, 3, H, W) in [0, 1] and prompts, or Refused with the status and what is wrong. Each
    image's size is read from its PNG header before its pixels are decoded, so that a small body of highly compressed
    images cannot make the server decode more than `max_request_pixels` pixels."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise Refused(400, 'the request needs "images": a list of base64 PNGs, and "prompts": a list of strings')
    images, prompts = request["images"], request.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise Refused(400, '"prompts" must be a list of strings, one per image')
    if len(prompts) != len(images) or not images:
        raise Refused(400, f"{len(images)} images and {len(prompts)} prompts: give one prompt per image, at least one")
    if len(images) > max_images:
        raise Refused(413, f"{len(images)} images in one request; this server takes at most {max_images}")
    decoded, left = [], max_request_pixels
    for i, text in enumerate(images):
        if not isinstance(text, str):
            raise Refused(400, f"image {i} is not a string of base64 text")
        try:
            decoded.append(image_from_base64(text, min(max_pixels, left)))
        except ValueError as e:
            if "pixels" in str(e) and left < max_pixels:
                raise Refused(413, f"the images have more than {max_request_pixels} pixels in all") from None
            raise Refused(413 if "pixels" in str(e) else 400, f"image {i} {e}") from None
        left -= decoded[-1].shape[1] * decoded[-1].shape[2]
    if len({tuple(image.shape) for image in decoded}) > 1:
        raise Refused(400, "the images differ in size: send one size per request")
    return torch.stack(decoded), prompts


def serve(
    reward_fn,
    spec: str,
    device,
    host: str,
    port: int,
    max_images: int = 512,
    max_pixels: int = 4096 * 4096,
    max_request_pixels: int = 2**27,
    max_body_mb: int = 1024,
):
    """A threaded HTTP server of `reward_fn` (not yet serving: call serve_forever, in a thread if need be)."""
    lock = threading.Lock()  # one batch at a time on the device

    class Handler(BaseHTTPRequestHandler):
        timeout = 120  # seconds a client may take to send its request

        def answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer(200, {"reward": spec, "protocol": "POST {prompts, images: base64 PNG} -> {rewards}"})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.answer(411, {"error": "the request needs a Content-Length"})
            if length > max_body_mb * 2**20:
                self.answer(413, {"error": f"a body of {length} bytes; this server takes at most {max_body_mb} MiB"})
                self.close_connection = True
                try:  # read and drop the body, so that the client, still sending it, then reads this answer rather
                    while 0 < length <= 4 * max_body_mb * 2**20:  # than a broken pipe (beyond 4 times the limit: not)
                        length -= len(self.rfile.read(min(length, 2**20))) or length
                except OSError:  # the client hung up first
                    pass
                return
            try:
                images, prompts = read_request(self.rfile.read(length), max_images, max_pixels, max_request_pixels)
            except Refused as e:
                return self.answer(e.status, {"error": str(e)})
            try:
                with lock, torch.no_grad():
                    rewards = reward_fn(images.to(device), prompts).float().cpu().tolist()
            except SystemExit:  # the reward's own sentence (common.rewards.Reward), printed on this server's stderr
                failed = f"the reward '{spec}' failed on this request (the server's log says why)"
                return self.answer(500, {"error": failed})
            self.answer(200, {"rewards": rewards})

        def log_message(self, format, *args):  # one line per request is noise at a request a second
            pass

    return ThreadingHTTPServer((host, port), Handler)


if __name__ == "__main__":
    install_error_handling()
    args = tyro.cli(Args, description=__doc__)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reward_fn = make_reward(args.reward, device, dtype)
    try:
        server = serve(
            reward_fn,
            args.reward,
            device,
            args.host,
            args.port,
            args.max_images,
            args.max_pixels,
            args.max_request_pixels,
            args.max_body_mb,
        )
    except OSError as e:  # the port is taken, or the address is not this machine's
        fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): choose another --port or --host")
    host, port = server.server_address[:2]
    print(f"serving the reward '{args.reward}' on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    server.serve_forever()
