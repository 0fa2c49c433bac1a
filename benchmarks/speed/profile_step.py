"""Where a DRaFT-1 step's time goes: `draft_k.py --k 1` timed by phase and profiled by kind of work.

    python benchmarks/speed/profile_step.py --out docs/results/profile_sd14.json      # SD 1.4's shapes, 512 px
    python benchmarks/speed/profile_step.py --family sdxl --out profile_sdxl.json     # SDXL's shapes, 1024 px
    python benchmarks/speed/profile_step.py --tiny --out /tmp/profile.json            # a CPU check of this file

draft_k.py runs its own loop on random weights with the shapes of the family's published configs (benchmarks/shared.py
builds them, and the aesthetic reward's CLIP ViT-L/14; nothing is downloaded), in a child process of this file with
common/hooks.py observing it: --warmup steps untimed, then --steps steps timed by phase, then --steps steps under
torch.profiler, then one more step, outside both, whose body also runs the run's final evaluation.
- Phases (wall clock, the device synchronised at each boundary, which costs a little): the denoiser's calls without
  gradient (sampling), its call with gradient (the step trained), the VAE's decode, the reward; the backward pass,
  split where its gradient reaches the reward's images and then the decoder's latents (tensor hooks): the reward's
  backward, the VAE's (with the decoder's recomputation: draft_k.py checkpoints it) and the denoiser's (with its
  recomputation, and the LoRA's gradients); and the rest of the step (the prompts' encoding, the optimizer, Python).
- Kinds of work: on CUDA the profiler's device time of each kernel, on the CPU each aten op's own time (its children
  excluded), sorted by name into matrix products, convolutions, attention, normalisation, memory copies, and
  elementwise and the rest; on CUDA also the device's idle time (the profiled window's wall time less its kernels'),
  on the CPU the time outside any op (Python, the framework). And the 15 most expensive kernels (ops on the CPU).
Writes the numbers as JSON (--out) and prints them as markdown for docs/BENCHMARKS.md.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import build_family, build_models, device_name  # noqa: E402
from common.cli import fail  # noqa: E402

# a kernel's or op's name (lower case) -> its kind, the first match winning (cuDNN's convolution kernels are implicit
# GEMMs, flash attention's are matrix products: so convolutions and attention are matched first)
KINDS = [
    ("attention", ("attention", "flash", "fmha", "sdpa")),
    ("convolutions", ("conv", "fprop", "dgrad", "wgrad", "cudnn")),
    (
        "matrix products",
        ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "cutlass", "cublas", "matmul"),
    ),
    ("normalisation", ("norm",)),
    ("memory copies", ("memcpy", "memset", "aten::copy_", "aten::cat", "aten::clone", "aten::contiguous")),
]
PHASES = ["sampling (no gradient)", "the step with gradient", "VAE decode", "reward", "backward: reward",
          "backward: VAE (recomputed)", "backward: denoiser (recomputed)",
          "the rest (encoding, optimizer, Python)"]  # fmt: skip


@dataclass
class Args:
    family: Literal["sd14", "sdxl"] = "sd14"
    """the shapes: SD 1.4's (512 px, 50 steps) or SDXL base 1.0's (1024 px, 20 steps, as gpu_check.py's SDXL part)"""
    models_dir: str = "bench_models"
    """where the random models are built (once) and read from"""
    resolution: Optional[int] = None
    """image size in pixels; by default the family's (32 with --tiny)"""
    num_steps: Optional[int] = None
    """sampling steps; by default 50 for sd14, 20 for sdxl (4 with --tiny)"""
    batch_size: int = 1
    """images a step (draft_k.py's --batch-size)"""
    warmup: int = 2
    """steps run first, not timed"""
    steps: int = 2
    """steps timed by phase, then as many profiled"""
    extra_args: str = ""
    """more flags for draft_k.py, e.g. '--no-torch-deterministic'"""
    tiny: bool = False
    """tiny shapes: a check of this file on the CPU, not a measurement"""
    out: str = "profile_step.json"
    """the numbers, as JSON"""
    child: bool = False
    """(internal) run the profiled script in this process"""


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KINDS if any(w in lowered for w in words)), "elementwise and the rest")


def profile(args: Args, model: str) -> dict:
    """draft_k.py in this process, observed through common/hooks.py: the phases' and the kinds' seconds a step."""
    from torch.profiler import ProfilerActivity

    from common import hooks

    cuda = torch.cuda.is_available()
    state = {"on": False, "backward": False, "marks": {}}
    phases, calls = defaultdict(float), defaultdict(int)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(module, name_of, mark=None) -> None:
        started = {}

        def pre(module, inputs):
            if state["on"] and not state["backward"]:  # a recomputation in the backward pass counts there
                started[id(module)] = clock()
                if mark and torch.is_grad_enabled() and inputs[0].requires_grad:
                    inputs[0].register_hook(lambda grad: state["marks"].setdefault(mark, clock()) and None)

        def post(module, inputs, output):
            if id(module) in started:
                name = name_of()
                phases[name] += clock() - started.pop(id(module))
                calls[name] += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def on_model(model):
        sampling = lambda: "the step with gradient" if torch.is_grad_enabled() else "sampling (no gradient)"  # noqa: E731
        timed(model.denoiser, sampling)
        timed(model.vae.decoder, lambda: "VAE decode", mark="vae")

    hooks.model_loaded.append(on_model)
    hooks.reward_made.append(lambda reward: timed(reward, lambda: "reward", mark="reward"))

    plain_backward = torch.Tensor.backward

    def backward(tensor, *a, **k):
        if not state["on"]:
            return plain_backward(tensor, *a, **k)
        state["backward"], state["marks"] = True, {}
        start = clock()
        plain_backward(tensor, *a, **k)
        end = clock()
        state["backward"] = False
        reward, vae = state["marks"].get("reward", start), state["marks"].get("vae", start)
        phases["backward: reward"] += reward - start
        phases["backward: VAE (recomputed)"] += vae - reward
        phases["backward: denoiser (recomputed)"] += end - vae

    torch.Tensor.backward = backward
    result = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = torch.profiler.profile(activities=activities)

    def loop(counts):  # the body of iteration i runs between its yield and the next
        for i, count in enumerate(counts):
            if i == args.warmup:
                state["on"], result["start"] = True, clock()
            if i == args.warmup + args.steps:
                state["on"], result["timed"] = False, clock() - result["start"]
                result["profile_start"] = clock()
                profiler.__enter__()
            if i == args.warmup + 2 * args.steps:  # the last step, whose body also runs the run's final evaluation
                profiler.__exit__(None, None, None)
                result["profiled"] = clock() - result["profile_start"]
            yield count

    hooks.training_loop.append(loop)
    with tempfile.TemporaryDirectory() as out:
        sys.argv = ["draft_k.py", "--pretrained-model", model, "--k", "1", "--reward", "aesthetic", "--batch-size",
                    str(args.batch_size), "--resolution", str(args.resolution), "--num-steps", str(args.num_steps),
                    "--train-steps", str(args.warmup + 2 * args.steps + 1), "--sample-every", "100000", "--save-every",
                    "100000", "--output-dir", out, *shlex.split(args.extra_args)]  # fmt: skip
        import runpy

        runpy.run_path(os.path.join(ROOT, "draft_k.py"), run_name="__main__")
    torch.Tensor.backward = plain_backward

    step = result["timed"] / args.steps
    phase_seconds = {name: phases[name] / args.steps for name in PHASES[:-1]}
    phase_seconds[PHASES[-1]] = step - sum(phase_seconds.values())
    device_type = "cuda" if cuda else "cpu"
    rows = []
    for event in profiler.key_averages():
        if cuda:  # kernels and the device's copies are the events that run on the device
            own = getattr(event, "self_device_time_total", 0) if str(event.device_type).endswith("CUDA") else 0
        else:
            own = event.self_cpu_time_total
        if own > 0:
            rows.append({"name": event.key, "seconds": own / 1e6 / args.steps, "calls": event.count / args.steps})
    window = result["profiled"] / args.steps
    kinds = defaultdict(float)
    for row in rows:
        kinds[kind_of(row["name"])] += row["seconds"]
    busy = sum(kinds.values())
    kinds["the device idle between kernels" if cuda else "outside any op (Python, the framework)"] = window - busy
    top = sorted(rows, key=lambda row: -row["seconds"])[:15]
    return {"device": device_name(), "device_type": device_type, "torch": torch.__version__, "family": args.family,
            "resolution": args.resolution, "num_steps": args.num_steps, "batch_size": args.batch_size,
            "extra_args": args.extra_args, "steps": args.steps, "step_seconds": step,
            "phases": phase_seconds, "phase_calls": {k: v / args.steps for k, v in calls.items()},
            "profiled_step_seconds": window, "kinds": dict(kinds), "top": top}  # fmt: skip


def markdown(report: dict) -> str:
    step, window = report["step_seconds"], report["profiled_step_seconds"]
    lines = [f"{report['device']}, torch {report['torch']}: {report['family']}'s shapes at {report['resolution']} px,"
             f" {report['num_steps']} steps, batch {report['batch_size']} {report['extra_args']}".rstrip(), "",
             f"| phase (a step: {step:.3f} s, synchronised) | seconds | share | calls |", "|-|-|-|-|"]  # fmt: skip
    for name, seconds in report["phases"].items():
        calls = report["phase_calls"].get(name, "")
        lines.append(f"| {name} | {seconds:.3f} | {seconds / step:.0%} | {calls if calls == '' else f'{calls:g}'} |")
    lines += ["", f"| kind of work (a profiled step: {window:.3f} s) | seconds | share |", "|-|-|-|"]
    for name, seconds in sorted(report["kinds"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {seconds:.3f} | {seconds / window:.0%} |")
    lines += ["", "| the 15 most expensive kernels (ops on the CPU) | seconds a step | calls a step |", "|-|-|-|"]
    for row in report["top"]:
        lines.append(f"| `{row['name'][:90]}` | {row['seconds']:.4f} | {row['calls']:g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    if min(args.batch_size, args.warmup, args.steps) < 1:
        fail("--batch-size, --warmup and --steps must be at least 1")
    args.resolution = args.resolution or (32 if args.tiny else 512 if args.family == "sd14" else 1024)
    args.num_steps = args.num_steps or (4 if args.tiny else 50 if args.family == "sd14" else 20)
    if args.child:
        report = profile(args, os.environ["PROFILE_STEP_MODEL"])
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        sys.exit(0)
    model = build_models(args.models_dir, args.tiny)  # the reward's models too, which the SDXL runs also use
    if args.family == "sdxl":
        model = build_family(args.models_dir, "sdxl", args.tiny)
    env = dict(os.environ, HF_HUB_CACHE=os.path.abspath(os.path.join(args.models_dir, "hub")), HF_HUB_OFFLINE="1",
               PROFILE_STEP_MODEL=os.path.abspath(model))  # fmt: skip
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--out", os.path.abspath(args.out), "--child"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"the profiled run failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    with open(os.path.abspath(args.out)) as f:
        print(markdown(json.load(f)))
