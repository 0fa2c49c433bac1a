"""Scoring while the next batch samples: a DDPO epoch's wall time with a slow served reward, in the background
(`--async-reward`, the default) against in turn (`--no-async-reward`).

    python benchmarks/speed/async_reward.py                     # tiny-sd, a thread each, about 4 minutes

The reward is reward_server.py's server of jpeg_incompressibility, started here on 127.0.0.1, that waits `--delay`
seconds before it answers each request: by default as long as sampling one batch takes (measured first, the same
batch, steps and guidance as the runs), the case the issue of served rewards is about (a judge that takes as long as
the sampler). Each DDPO run (ddpo.py --preset tiny, one CPU thread) samples `--batches` batches an epoch; the runs
alternate (in the background, in turn, ...) so that drifts in machine load hit both alike, and the median epoch
(epochs 2 on: the first one warms up) is compared. Expected: in turn an epoch is batches x (sampling + delay) plus
training; in the background the delay of all but the last batch is hidden behind sampling.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common.cli import fail, install_error_handling  # noqa: E402
from common.models import load_model  # noqa: E402
from common.rewards import make_reward  # noqa: E402
from common.sampling import sample  # noqa: E402
from reward_server import serve  # noqa: E402


@dataclass
class Args:
    model: str = "assets/tiny-sd"
    """the pipeline folder of the runs"""
    batches: int = 4
    """sampling batches an epoch (of 32 images each)"""
    epochs: int = 4
    """epochs a run (the first one is not timed)"""
    repeats: int = 2
    """runs of each kind, alternating"""
    delay: float = -1.0
    """seconds the server waits before each answer; -1: as long as sampling one batch takes"""
    num_steps: int = 10
    """sampling steps (the tiny preset's 10)"""


def sampling_seconds(model_path: str, num_steps: int) -> float:
    """The median seconds of sampling and decoding one batch as the runs do (32 images, guidance 5, the tiny preset's
    shapes), on one thread."""
    model = load_model(model_path, device="cpu", dtype=torch.float32, resolution=32, num_steps=num_steps)
    cond = model.encode(["a red circle on a white background"] * 32)
    times = []
    for seed in range(4):
        latents = model.initial_latents(32, torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        with torch.no_grad():
            x0, _ = sample(model, latents, cond, num_steps, 5.0, eta=1.0, generator=torch.Generator().manual_seed(seed))
            model.decode(x0)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def epoch_seconds(url: str, background: bool, args: Args, out: str) -> list[float]:
    """A DDPO run against the served reward; the seconds of its epochs 2 on."""
    samples = 32 * args.batches
    command = [sys.executable, "ddpo.py", "--preset", "tiny", "--pretrained-model", args.model, "--reward", url,
               "--num-epochs", str(args.epochs), "--samples-per-epoch", str(samples), "--sample-batch-size", "32",
               "--train-batch-size", "32", "--num-steps", str(args.num_steps), "--sample-every", "1000", "--save-every",
               "1000", "--output-dir", out,
               "--async-reward" if background else "--no-async-reward"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"the DDPO run failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    (run,) = os.listdir(out)
    with open(os.path.join(out, run, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [samples / line["images_per_sec"] for line in lines[1:]]


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    if min(args.batches, args.repeats, args.num_steps) < 1 or args.epochs < 2:
        fail("--batches, --repeats and --num-steps must be at least 1, --epochs at least 2")
    install_error_handling()
    torch.set_num_threads(1)
    delay = sampling_seconds(args.model, args.num_steps) if args.delay < 0 else args.delay
    reward = make_reward("jpeg_incompressibility")

    def slow(images, prompts):
        time.sleep(delay)
        return reward(images, prompts)

    server = serve(slow, "jpeg_incompressibility (slowed)", "cpu", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for background in (True, False):
                out = os.path.join(folder, f"{background}_{repeat}")
                times[background] += epoch_seconds(url, background, args, out)
    server.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; {args.model},"
        f" {args.batches} batches of 32 an epoch; the server waits {delay:.2f} s an answer (one batch's sampling)"
    )
    for background, name in ((True, "background"), (False, "in turn")):
        t = times[background]
        print(f"{name:>10}: median epoch {median[background]:.2f} s (min {min(t):.2f}, max {max(t):.2f}) over {len(t)}")
    print(f"ratio background / in turn: {median[True] / median[False]:.3f}")
