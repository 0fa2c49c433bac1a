"""One command for a GPU machine: everything the project measures on a GPU, in priority order, within a time budget.

    python benchmarks/speed/gpu_check.py --out-dir $OUT                # a GPU: SD 1.4 / SDXL / SD 3.5 shapes
    python benchmarks/speed/gpu_check.py --dry-run --out-dir /tmp/gc   # the same plan at tiny shapes on the CPU

The plan, each part a run of another benchmark of this folder or of peers/ in a child process, in this order, so that
what matters most is measured first if the budget runs out (a part that would start after the budget is recorded as
skipped; a part that fails is recorded with its last lines and the plan goes on, and the command then ends with exit
status 2 and one sentence naming the parts that failed):
1. the device's ceilings: a bf16 8192^3 matrix product (TFLOP/s) and a device-to-device copy (GB/s)
2. where a DRaFT-1 step's time goes, at SD 1.4's shapes (512 px, 50 steps) and SDXL's (1024 px, 20 steps), batch 1:
   by phase and by kind of work under torch.profiler, and the 15 most expensive kernels (speed/profile_step.py)
3. the SDXL DRaFT-1 step at batch 1 (`draft_k.py --k 1`, 20 steps), then each lever alone against it:
   --no-torch-deterministic, batch 4, and levers.py's channels_last, cudnn_benchmark and compile
4. the six scripts at SD 1.4's shapes (random weights, 512 px, bf16), each at its default batch for 3 optimizer steps
   (DDPO and RWR: 3 epochs of 8 images): images/s after the first step, peak memory, FLOPs per step (attention
   included) and model-FLOP utilisation (speed/sd14_scale.py)
5. SD 3.5 Medium's shapes at 1024 px, batch 1: `draft_k.py --k 1` (20 steps), and `ddpo.py` on SDXL's and SD 3.5's
   (10 steps, 2 images an epoch); memory at batch 1 does not depend on the number of steps for these two
6. DDPO and DRaFT (full backpropagation) at SD 1.4's shapes and batch 1: the memory targets
7. the pairs with TRL 0.23.1: ddpo.py against DDPOTrainer and draft_k.py --k 1 against AlignPropTrainer on the same
   work, one interleaved repeat (peers/trl_trainers.py --sd14)
8. the other four scripts at batch 1
Writes gpu_check.json (every part's numbers, the device, versions, date and command) and gpu_check.md (the tables)
to --out-dir, after every part, so that a run cut short still leaves what it measured.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import build_family, build_models, device_name  # noqa: E402
from benchmarks.speed.profile_step import markdown  # noqa: E402
from common.cli import fail  # noqa: E402

DRAFT_AND_BRAID = ["draft_full.py", "draft_k.py", "draft_lv.py", "braid.py"]
LEVER_PARTS = ["channels_last", "cudnn_benchmark", "compile"]  # levers.py's, each measured alone
BATCH_1 = {"draft_full.py": "--batch-size 1", "draft_k.py": "--batch-size 1", "draft_lv.py": "--batch-size 1",
           "braid.py": "--batch-size 1", "ddpo.py": "--sample-batch-size 1 --train-batch-size 1",
           "rwr.py": "--sample-batch-size 1 --train-batch-size 1"}  # fmt: skip


@dataclass
class Args:
    out_dir: str = "gpu_check"
    """where gpu_check.json and gpu_check.md are written"""
    models_dir: str = "bench_models"
    """where the random models are built (once) and read from"""
    budget: float = 450.0
    """seconds: no part starts after this much time has passed"""
    dry_run: bool = False
    """the same plan at tiny shapes (32 px, 4 DDIM steps, TRL's pair on tiny-sd): a CPU check of this file"""
    only: tuple[str, ...] = ()
    """run only the parts whose name contains one of these texts (e.g. sdxl 'batch 1'), to rerun what a first run
    missed"""


def ceilings(dry_run: bool) -> dict:
    """The device's measured ceilings: a bf16 matrix product and a device-to-device copy (the median of 10 after 3
    warm-ups), the rates the model-FLOP utilisation and the memory traffic are held to."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, size = (256, 2**20) if dry_run or device == "cpu" else (8192, 2**30)
    a, b = (
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
        torch.randn(n, n, device=device, dtype=torch.bfloat16),
    )
    x = torch.randn(size // 2, device=device, dtype=torch.bfloat16)  # `size` bytes

    def median_seconds(f):
        times = []
        for i in range(13):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[3:])[5]

    matmul = median_seconds(lambda: a @ b)
    copy = median_seconds(lambda: x.clone())
    return {"bf16_matmul_tflops": 2 * n**3 / matmul / 1e12, "copy_gb_per_s": 2 * size / copy / 1e9, "n": n}


def plan(args: Args, python: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each part, in priority order; the commands write their JSON to {json}."""
    tiny = ["--tiny", "--steps", "2"] if args.dry_run else ["--steps", "3"]
    tiny += ["--samples-per-epoch", "8"]  # DDPO's and RWR's default batches: 8 to sample, 4 to train
    scale = [python, "benchmarks/speed/sd14_scale.py", "--models-dir", args.models_dir, *tiny, "--out", "{json}"]
    profile = [python, "benchmarks/speed/profile_step.py", "--models-dir", args.models_dir, "--out", "{json}"]
    profile += ["--tiny", "--warmup", "1", "--steps", "1"] if args.dry_run else []
    parts = [
        ("profile sd14 draft_k.py --k 1", profile),
        ("profile sdxl draft_k.py --k 1", [*profile, "--family", "sdxl"]),
    ]
    steps = lambda n: "" if args.dry_run else f" --num-steps {n}"  # noqa: E731
    shapes = {}
    for family in ("sdxl", "sd35"):
        model = os.path.join(args.models_dir, f"{family}-{'tiny' if args.dry_run else 'random'}")
        shapes[family] = ["--model", model] + (["--resolution", "32"] if args.dry_run else ["--resolution", "1024"])
    # the SDXL DRaFT-1 step at batch 1, then each lever alone against it, in the same run
    draft_1 = [*scale, *shapes["sdxl"], "--scripts", "draft_k.py"]
    default = "--extra-args=--k 1 --batch-size 1" + steps(20)
    parts.append(("sdxl draft_k.py --k 1 batch 1", [*draft_1, default]))
    parts.append(("sdxl lever --no-torch-deterministic", [*draft_1, default + " --no-torch-deterministic"]))
    parts.append(("sdxl lever batch 4", [*draft_1, default.replace("--batch-size 1", "--batch-size 4")]))
    parts += [(f"sdxl lever {lever}", [*draft_1, default, "--levers", lever]) for lever in LEVER_PARTS]
    parts.append(("sd14 default batch", scale))
    parts.append(("sd35 draft_k.py --k 1 batch 1", [*scale, *shapes["sd35"], "--scripts", "draft_k.py", default]))
    for family in ("sdxl", "sd35"):
        ddpo = [*scale, *shapes[family], "--scripts", "ddpo.py", "--samples-per-epoch", "2"]
        parts.append((f"{family} ddpo.py batch 1", [*ddpo, "--extra-args=" + BATCH_1["ddpo.py"] + steps(10)]))
    for script in ["ddpo.py", "draft_full.py"]:
        parts.append((f"sd14 batch 1 {script}", [*scale, "--scripts", script, "--extra-args=" + BATCH_1[script]]))
    if args.dry_run:
        trl = ["--num-steps", "2", "--ddpo-epochs", "3", "--draft-steps", "3", "--samples-per-epoch", "4",
               "--sample-batch-size", "2", "--train-batch-size", "2", "--batch-size", "2"]  # fmt: skip
    else:
        trl = ["--sd14", "--models-dir", args.models_dir, "--threads", "0", "--precision", "bf16", "--ddpo-epochs",
               "3", "--draft-steps", "4", "--samples-per-epoch", "16"]  # fmt: skip
    parts.append(("trl pairs", [python, "benchmarks/peers/trl_trainers.py", *trl, "--repeats", "1", "--out", "{json}"]))
    for script in ["draft_k.py", "draft_lv.py", "rwr.py", "braid.py"]:
        parts.append((f"sd14 batch 1 {script}", [*scale, "--scripts", script, "--extra-args=" + BATCH_1[script]]))
    return [(name, command) for name, command in parts if not args.only or any(text in name for text in args.only)]


def table(report: dict) -> str:
    """gpu_check.md: one row per script run, then the TRL pairs and the parts that did not run."""
    c = report.get("ceilings") or {}
    lines = [f"{report['device']}, {report['date']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"measured ceilings: bf16 matrix product {c.get('bf16_matmul_tflops', 0):.0f} TFLOP/s, device copy "
             f"{c.get('copy_gb_per_s', 0):.0f} GB/s", "",
             "| part | script | images/s | TFLOP per step | MFU (measured bf16 rate) | MFU (datasheet bf16 peak) | "
             "peak memory (GB) |", "|-|-|-|-|-|-|-|"]  # fmt: skip
    peak = c.get("bf16_matmul_tflops")
    for part in report["parts"]:
        for r in (part.get("result") or {}).get("results", []) if "sd14_scale" in part["command"] else []:
            if "error" in r:
                lines.append(f"| {part['name']} | {r['script']} | failed: {r['error'].splitlines()[0][:150]} ||||")
                continue
            tflop = r.get("tflop_per_step")
            step_s = r["images_per_step"] / r["images_per_sec"] if r.get("images_per_step") else None
            mfu = f"{100 * tflop / step_s / peak:.0f}%" if tflop and step_s and peak else "n/a"
            datasheet = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "n/a"
            mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "n/a"
            if r.get("peak_mem_gb") is None and r.get("peak_rss_gb") is not None:  # no GPU (--dry-run): the process's
                mem = f"{r['peak_rss_gb']:.1f} (resident set)"
            lines.append(f"| {part['name']} | {r['script']} | {r['images_per_sec']:.2f} | "
                         f"{f'{tflop:.1f}' if tflop else 'n/a'} | {mfu} | {datasheet} | {mem} |")  # fmt: skip
    for part in report["parts"]:
        if "profile_step" in part["command"] and part.get("result"):  # its own tables (speed/profile_step.py)
            lines += ["", f"### {part['name']}", "", markdown(part["result"])]
        if "trl_trainers" in part["command"] and part.get("result"):  # its own table (peers/trl_trainers.py)
            header = ("| pair | ours images/s | TRL images/s | ours / TRL | ours / TRL per CPU second | peak memory "
                      "(GB): ours | TRL | eval reward before -> after: ours | TRL |")  # fmt: skip
            lines += ["", header, "|-|-|-|-|-|-|-|-|-|"]
            lines += [" | ".join(["", r["pair"], *r["table"], ""]).strip() for r in part["result"]["summary"]]
        if part["status"] != "ok":
            lines.append(
                f"\n{part['name']}: {part['status']}" + (f"\n```\n{part['tail']}\n```" if part.get("tail") else "")
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.dry_run and not torch.cuda.is_available():
        fail("no GPU is visible to torch; gpu_check.py measures a GPU (pass --dry-run to check the plan on the CPU)")
    if args.budget <= 0:
        fail(f"--budget must be positive, got {args.budget}")
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ, HF_HUB_CACHE=os.path.abspath(os.path.join(args.models_dir, "hub")), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")  # fmt: skip
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("diffusers", "transformers", "peft"):
        versions[package] = __import__(package).__version__
    report = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "versions": versions,
              "command": " ".join(sys.argv), "ceilings": ceilings(args.dry_run), "parts": []}  # fmt: skip

    def write():
        with open(os.path.join(args.out_dir, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out_dir, "gpu_check.md"), "w") as f:
            f.write(table(report))

    write()
    print(f"ceilings: {report['ceilings']}", flush=True)
    build_models(args.models_dir, args.dry_run)  # SD 1.4's shapes and the reward models, before anything is timed
    print(f"models built after {time.time() - start:.0f} s", flush=True)
    for name, command in plan(args, sys.executable):
        part = {"name": name, "command": " ".join(command).replace("{json}", "<json>")}
        report["parts"].append(part)
        left = args.budget - (time.time() - start)
        if left <= 0:
            part["status"] = "skipped: the budget was spent"
            continue
        began = time.time()
        family = name.split()[1] if name.startswith("profile") else name.split()[0]
        if family in ("sdxl", "sd35"):  # built when first needed: a budget spent earlier builds nothing
            build_family(args.models_dir, family, args.dry_run)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "part.json")
            try:
                result = subprocess.run([c.replace("{json}", out) for c in command], cwd=ROOT, env=env,
                                        capture_output=True, text=True, timeout=max(left, 60))  # fmt: skip
                part["status"] = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
                part["tail"] = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            except subprocess.TimeoutExpired:
                part["status"] = "stopped: ran past the budget"
            part["seconds"] = round(time.time() - began, 1)
            if os.path.isfile(out):
                with open(out) as f:
                    part["result"] = json.load(f)
        if part["status"] == "ok":
            part.pop("tail", None)
        print(f"{name}: {part['status']} in {part['seconds']} s", flush=True)
        write()
    report["seconds"] = round(time.time() - start, 1)
    write()
    print(table(report))
    failed = [part["name"] for part in report["parts"] if part["status"].startswith("failed")]
    if failed:  # the plan went on past them; the exit status says that it did not all work
        fail(f"{len(failed)} of {len(report['parts'])} parts failed ({', '.join(failed)}); gpu_check.md in "
             f"{args.out_dir} holds the last lines each printed")  # fmt: skip
