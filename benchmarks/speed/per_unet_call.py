"""Per UNet pass: the scripts without a peer in TRL (rwr.py, draft_lv.py, braid.py) next to their siblings that have
one (ddpo.py, draft_k.py, which benchmarks/peers/trl_trainers.py compares with TRL), on tiny-sd on the CPU.

    python benchmarks/speed/per_unet_call.py            # every case, 3 repeats, one thread per run

Each case runs its script as `python script.py --preset tiny ...` (20 DDIM steps, guidance 5, colourfulness) in a
fresh process under benchmarks/shared.py's meter: a hook on the UNet counts its forward passes and their rows, with
autograd off (sampling) and on (the steps that carry gradient, and checkpointing's recomputations), and the training
loop's iterations are timed in CPU time (the first and the last are not). The cases alternate, in reverse order every
other repeat. Reported per case: CPU seconds per iteration (median and range over the repeats), UNet passes and rows
per iteration, and CPU milliseconds per UNet row. Between siblings whose passes are of the same kind, a higher cost per
row is time spent outside the UNet. Every run's numbers go to --out (docs/results/per_unet_call.json).
"""

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import median_range  # noqa: E402
from common.cli import fail  # noqa: E402

SAMPLING = dict(num_steps=20, guidance_scale=5.0, reward="colorfulness")  # what the DRaFT presets already use
CASES = {  # name: (script, flags on top of --preset tiny); siblings side by side
    "ddpo": ("ddpo.py", dict(SAMPLING, num_epochs=5, samples_per_epoch=32, sample_batch_size=8, train_batch_size=4)),
    "rwr": ("rwr.py", dict(SAMPLING, num_epochs=5, samples_per_epoch=32, sample_batch_size=8, train_batch_size=4,
                           num_inner_epochs=1)),
    "draft_k": ("draft_k.py", dict(k=1, train_steps=12)),
    "draft_lv": ("draft_lv.py", dict(n=2, train_steps=12)),
    "braid": ("braid.py", dict(k=1, train_steps=12, offline_size=32, reward_model_steps=50)),
    "draft_full": ("draft_full.py", dict(train_steps=5)),
    "braid_all_steps": ("braid.py", dict(train_steps=5, offline_size=32, reward_model_steps=50)),
}  # fmt: skip


@dataclass
class Args:
    cases: list[str] = field(default_factory=lambda: list(CASES))
    """the cases to run (see CASES)"""
    repeats: int = 3
    """runs of each case"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS too)"""
    out: str = "docs/results/per_unet_call.json"
    """every run's numbers, as JSON"""


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # per_unet_call.py --child CASE THREADS
        import torch

        from benchmarks.shared import Meter, run_script

        torch.set_num_threads(int(sys.argv[3]))
        script, flags = CASES[sys.argv[2]]
        meter = Meter()
        run_script(script, {"preset": "tiny", "sample_every": 10**6, "save_every": 10**6, **flags}, meter)
        print("RESULT " + json.dumps(meter.result(images_per_iteration=1)), flush=True)
        raise SystemExit(0)
    args = tyro.cli(Args)
    if set(args.cases) - set(CASES):
        fail(f"unknown case(s) {sorted(set(args.cases) - set(CASES))}; choose from: {', '.join(CASES)}")
    if args.repeats < 1 or args.threads < 1:
        fail(f"--repeats and --threads must be at least 1, got {args.repeats} and {args.threads}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    runs = {case: [] for case in args.cases}
    for repeat in range(args.repeats):
        for case in args.cases if repeat % 2 == 0 else args.cases[::-1]:
            command = [sys.executable, os.path.abspath(__file__), "--child", case, str(args.threads)]
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                sys.exit(f"{case} failed:\n{result.stderr[-3000:]}")
            runs[case].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"repeat {repeat} {case}: {statistics.median(runs[case][-1]['cpu_seconds']):.3f} CPU s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "cases": {case: CASES[case] for case in args.cases}, "runs": runs}, f, indent=1)
    print("\n| case | script, flags on top of --preset tiny | CPU s per iteration | UNet passes (rows) per iteration:"
          " autograd off / on | CPU ms per UNet row |\n|-|-|-|-|-|")  # fmt: skip
    for case, case_runs in runs.items():
        seconds = [statistics.median(run["cpu_seconds"]) for run in case_runs]
        passes = case_runs[0]["unet_passes"][0]  # the same in every timed iteration of these cases
        rows = passes["rows"] + passes["grad_rows"]
        script, flags = CASES[case]
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if k not in SAMPLING)
        print(f"| {case} | {script} {flags} | {median_range(seconds, 3)}"
              f" | {passes['passes']} ({passes['rows']}) / {passes['grad_passes']} ({passes['grad_rows']})"
              f" | {1e3 * statistics.median(seconds) / rows:.2f} |")  # fmt: skip
