"""Speed and memory of the six scripts at Stable Diffusion 1.4 scale, on random weights (no downloads).

    python benchmarks/speed/sd14_scale.py                  # on a GPU: builds the models once, then times each script
    python benchmarks/speed/sd14_scale.py --scripts draft_k.py --extra-args "--mixed-precision no"   # one at a time
    python benchmarks/speed/sd14_scale.py --levers channels_last    # a lever from outside the scripts (levers.py)
    python benchmarks/speed/sd14_scale.py --tiny --steps 2 --out /tmp/tiny.json    # a smoke run on the CPU (tests)

1. Builds, in --models-dir, SD-1.4-shaped random models (SD 1.4's and CLIP ViT-L/14's configs): a pipeline folder
   (UNet 860M, VAE, CLIP text encoder, a tokenizer from a small vocabulary) and, in a Hugging Face cache layout,
   CLIP ViT-L/14 and an aesthetic head, so that `--reward aesthetic` resolves offline to them (HF_HUB_CACHE,
   HF_HUB_OFFLINE=1).
2. Runs each script as `python script.py ...` at 512 px with its default batch for --steps optimizer steps (DDPO and
   RWR: epochs of --samples-per-epoch images) and reads its metrics.jsonl: the median images/s over the steps after
   the first (the warm-up), the peak GPU memory, and the peak resident set of the script's process (on the CPU,
   its memory).
3. Counts the FLOPs of one step (torch's formulas, attention included: benchmarks/shared.py's FlopCounter) during
   the first step of that same run, the warm-up
   that is not timed (the script runs in a child process of this file, under the counter from the first step's
   start to the second's: loading, the offline data and the sample grids are outside it). The model-FLOP
   utilisation is that count per second of a step over the device's dense bf16 peak. No count with --levers: they
   change how fast the same work runs, not the work, which the plain run counts.
Prints a markdown table for docs/BENCHMARKS.md and writes the numbers to --out as JSON (docs/results/sd14_scale.json).
"""

import json
import os
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import build_models, device_name  # noqa: E402
from benchmarks.speed.levers import LEVERS  # noqa: E402
from common.cli import fail  # noqa: E402

SCRIPTS = ["draft_full.py", "draft_k.py", "draft_lv.py", "ddpo.py", "rwr.py", "braid.py"]
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


@dataclass
class Args:
    models_dir: str = "bench_models"
    """where the random models are built (once) and read from"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """the scripts to time"""
    steps: int = 5
    """optimizer steps (epochs for DDPO and RWR) timed per script; the first is the warm-up"""
    samples_per_epoch: int = 32
    """DDPO's and RWR's images per epoch here (their default 256 makes an epoch minutes long)"""
    extra_args: str = ""
    """passed to every script, one lever at a time, e.g. --extra-args '--mixed-precision no'"""
    levers: list[str] = field(default_factory=list)
    """levers switched on from outside the scripts (levers.py, beside this file): tf32 channels_last fused_adamw
    compile"""
    count_flops: bool = True
    """count the first step's FLOPs, in the warm-up step that is not timed (never with --levers)"""
    peak_tflops: Optional[float] = None
    """the device's dense bf16 peak in TFLOP/s; by default looked up from the GPU's name"""
    tiny: bool = False
    """tiny shapes at 32 px instead of SD 1.4's at 512: to check this file on a CPU, not to measure"""
    model: Optional[str] = None
    """another pipeline folder to run the scripts on instead of the SD-1.4-shaped one (e.g. an SDXL-shaped one that
    gpu_check.py builds); the reward models are still the ones built in --models-dir"""
    resolution: Optional[int] = None
    """image size in pixels; by default 512 (32 with --tiny)"""
    out: str = "docs/results/sd14_scale.json"
    """the numbers, as JSON"""


def script_args(script: str, model: str, steps: int, args: Args) -> list[str]:
    """The script at SD 1.4 scale with its default batch, `steps` steps, no grids or checkpoints on the way."""
    resolution = ["--resolution", str(args.resolution or (32 if args.tiny else 512))]
    resolution += ["--num-steps", "4"] if args.tiny else []
    common = ["--pretrained-model", model, *resolution, "--sample-every", "100000", "--save-every", "100000"]
    if script in ("ddpo.py", "rwr.py"):
        length = ["--num-epochs", str(steps), "--samples-per-epoch", str(args.samples_per_epoch),
                  "--reward", "jpeg_compressibility"]  # fmt: skip
    elif script == "braid.py":  # a small offline set: its synthesis is not what is timed
        length = ["--train-steps", str(steps), "--offline-size", "16", "--labeler", "aesthetic"]
    else:
        length = ["--train-steps", str(steps), "--reward", "aesthetic"]
    return [*common, *length, *shlex.split(args.extra_args)]


def images_per_step(script: str, args: Args) -> int:
    """The images a script's images_per_sec counts in one step (an epoch for DDPO and RWR), at its defaults."""
    if script in ("ddpo.py", "rwr.py"):
        return args.samples_per_epoch
    defaults = runpy.run_path(os.path.join(ROOT, script))["Args"]()  # the script's definitions, not its training
    extra = shlex.split(args.extra_args)
    flags = dict(zip(extra[::2], extra[1::2]))  # e.g. --batch-size 1 among the levers
    batch = int(flags.get("--batch-size", defaults.batch_size)) * int(
        flags.get("--grad-accum-steps", defaults.grad_accum_steps)
    )
    return batch * int(flags.get("--n", getattr(defaults, "n", 1)))  # DRaFT-LV scores n copies of each


def count_flops(script: str, script_args: list[str]) -> int:
    """Runs the script in this process (a child process) and returns the FLOPs of its first training iteration (a
    step; an epoch for DDPO and RWR): the counter is on from its start to the second's, so loading, BRAID's offline
    data and the sample grids are outside it."""
    from benchmarks.shared import FlopCounter
    from common import hooks

    counter = FlopCounter()

    def counted(counts):  # the body of the first iteration runs between its yield and the next
        for i, count in enumerate(counts):
            if i < 2:
                counter.__enter__() if i == 0 else counter.__exit__(None, None, None)
            yield count

    hooks.training_loop.append(counted)
    sys.argv = [script, *script_args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return counter.flops


def run(command: list[str], env: dict) -> tuple[str, Optional[str], float]:
    """The script's output, None or why it failed (its one sentence: a setting it refused, memory it ran out of; or
    the end of its traceback), and the peak resident set of its process in GB (the CPU's measure of memory: the
    loaded models, the libraries and what the run holds; os.wait4 reports it for this one child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # kB on Linux
    last = (stderr.strip().splitlines() or [""])[-1]
    if process.returncode == 2 and last.startswith("error: "):
        return stdout, last.removeprefix("error: "), rss_gb
    if process.returncode != 0:
        return stdout, f"{' '.join(command)} failed:\n{stderr[-3000:]}", rss_gb
    return stdout, None, rss_gb


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--count-flops-child":  # sd14_scale.py --count-flops-child script ...
        print("FLOPS", count_flops(sys.argv[2], sys.argv[3:]), flush=True)
        raise SystemExit(0)
    args = tyro.cli(Args)
    if set(args.levers) - set(LEVERS):
        fail(f"unknown lever(s) {sorted(set(args.levers) - set(LEVERS))}; choose from: {', '.join(LEVERS)}")
    if set(args.scripts) - set(SCRIPTS):
        fail(f"unknown script(s) {sorted(set(args.scripts) - set(SCRIPTS))}; choose from: {', '.join(SCRIPTS)}")
    if args.steps < 1 or args.samples_per_epoch < 1:
        fail(f"--steps and --samples-per-epoch must be at least 1, got {args.steps} and {args.samples_per_epoch}")
    count = args.count_flops and not args.levers
    if count and args.steps < 2:
        fail("--steps must be at least 2 to count the FLOPs of the first (or pass --no-count-flops)")
    cuda = torch.cuda.is_available()
    built = build_models(args.models_dir, args.tiny)
    model = args.model or built
    env = dict(os.environ, HF_HUB_CACHE=os.path.abspath(os.path.join(args.models_dir, "hub")), HF_HUB_OFFLINE="1")
    name = device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None
    results = []
    for script in args.scripts:
        if count:  # this file runs the script, with the counter on during its first step
            launcher = [os.path.abspath(__file__), "--count-flops-child"]
        else:
            launcher = [os.path.join("benchmarks", "speed", "levers.py"), ",".join(args.levers)] if args.levers else []
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, *launcher, script, *script_args(script, model, args.steps, args),
                       "--output-dir", out]  # fmt: skip
            start = time.time()
            stdout, error, rss_gb = run(command, env)
            if error:  # recorded, and the next script runs: one failure does not cost the others' numbers
                results.append({"script": script, "levers": args.levers, "error": error})
                print(json.dumps(results[-1]), flush=True)
                continue
            (run_dir,) = os.listdir(out)
            with open(os.path.join(out, run_dir, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
        # the first step warms up (and counts FLOPs); the last one draws the final sample grid
        timed = metrics[1:-1] or metrics[-1:]
        result = {
            "script": script,
            "levers": args.levers,
            "images_per_sec": statistics.median(m["images_per_sec"] for m in timed),
            "images_per_step": images_per_step(script, args),
            "peak_mem_gb": max((m.get("peak_mem_gb") or 0.0) for m in metrics) if cuda else None,
            "peak_rss_gb": rss_gb,
            "wall_s": time.time() - start,
        }
        if count:
            flops = next(line for line in stdout.splitlines()[::-1] if line.startswith("FLOPS "))
            result["tflop_per_step"] = int(flops.removeprefix("FLOPS ")) / 1e12
            if peak:
                step_s = result["images_per_step"] / result["images_per_sec"]
                result["mfu"] = result["tflop_per_step"] / step_s / peak
        results.append(result)
        print(json.dumps(result), flush=True)

    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("diffusers", "transformers", "peft"):
        versions[package] = __import__(package).__version__
    report = {"device": name, "peak_bf16_tflops": peak, "date": time.strftime("%Y-%m-%d"), "versions": versions,
              "levers": args.levers, "command": " ".join(sys.argv), "results": results}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"\n{name}, {report['date']}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; levers: {', '.join(args.levers) or 'none'}"
    )
    print("| script | images/s | TFLOP per step | MFU (bf16 peak) | peak GPU memory (GB) | peak resident set (GB) |")
    print("|-|-|-|-|-|-|")
    for r in results:
        if "error" in r:
            print(f"| {r['script']} | failed: {r['error'].splitlines()[0][:120]} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        tflop = f"{r['tflop_per_step']:.1f}" if "tflop_per_step" in r else "n/a"
        print(f"| {r['script']} | {r['images_per_sec']:.2f} | {tflop} | {mfu} | {mem} | {r['peak_rss_gb']:.1f} |")
    failed = [r for r in results if "error" in r]
    if failed:  # the first failure decides the exit status: a script's own sentence (2), or its traceback (1)
        error = failed[0]["error"]
        fail(f"{failed[0]['script']}: {error}") if "\n" not in error else sys.exit(error)
