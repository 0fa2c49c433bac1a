"""The six methods side by side on one task: the shipped tiny model, colourfulness, the `shapes` prompts.

    python benchmarks/results/compare.py --jobs 2     # the full run: LR sweep on seed 0, 3 seeds at the best LR, the
                                                      # claims' runs: 147 min of one-thread runs, ~80 at 2 jobs
    python benchmarks/results/compare.py --claims     # claims (b) and (e): gradient variance, LoRA scale and mix
    python benchmarks/results/compare.py --summarize  # docs/RESULTS.md and docs/results/*.png from the runs' files
    python benchmarks/results/compare.py --quick      # a smoke run of all of it: tiny budget, 1 seed, no sweep, then
                                                      # its summary, everything in runs/compare_quick/

Every method runs as users run it (`python script.py --preset tiny ...` in a subprocess) and is read back from its
run folder (metrics.jsonl, samples/). One budget of reward queries for all: one decoded image scored by the reward
is one query. DRaFT: batch_size x grad_accum per step (DRaFT-LV: n x batch_size); DDPO and RWR: samples_per_epoch
per epoch; BRAID: its offline data (offline_size queries of the labeler) and 0 online queries of the true reward.
The held-out evaluations (8 images every few steps) are not counted: they are the measurement, not training signal.
The held-out reward is the colourfulness of the run's sample grids (4 held-out prompts x 2 seeds), read back from
the PNGs, for every method alike (BRAID's own eval_reward_mean is its conservative reward, not the true one).
Runs go to {output_dir}/{method}/lr{lr}/seed{seed}/; a run whose metrics.jsonl reached its last step is skipped, a
half-written one is started again, so an interrupted sweep resumes. wall_clock.json beside metrics.jsonl records
when each line appeared (seconds since the process started: loading, offline data and evaluations included).
The TRL row needs benchmarks/peers/requirements-trl.txt, the curves benchmarks/results/requirements-plots.txt.
"""

import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.shared import mean_sd  # noqa: E402  (the repository's root is on the path only from here)
from common.cli import fail  # noqa: E402
from common.prompts import load_prompts, split_prompts  # noqa: E402

# the task, the same for every method (flags after --preset tiny). Guidance 5 and 10 DDIM steps for all, so that
# the held-out grids come from the same sampler (the tiny presets differ: RWR's uses guidance 1, DRaFT's 20 steps)
TASK = ["--preset", "tiny", "--prompts", "shapes", "--resolution", "32", "--num-steps", "10", "--guidance-scale", "5"]
REWARD = ["--reward", "colorfulness"]
# BRAID at its defaults (gradient and KL through all 10 steps, as draft_full.py), labelled by the true reward
BRAID = ["--labeler", "colorfulness"]
# name: (script, flags, default learning rate, counter). RWR's beta: its preset's 30 is for a reward in kB with a
# spread of 0.07 (beta x spread ~ 2); colourfulness spreads by ~40, so 0.05 keeps beta x spread ~ 2
METHODS = {
    "draft_full": ("draft_full.py", REWARD, 4e-4, "step"),
    "draft_k1": ("draft_k.py", [*REWARD, "--k", "1"], 4e-4, "step"),
    "draft_lv2": ("draft_lv.py", [*REWARD, "--n", "2"], 4e-4, "step"),
    "ddpo_is": ("ddpo.py", [*REWARD, "--estimator", "is"], 3e-2, "epoch"),
    "ddpo_sf": ("ddpo.py", [*REWARD, "--estimator", "sf"], 3e-2, "epoch"),
    "rwr_softmax": ("rwr.py", [*REWARD, "--beta", "0.05", "--num-inner-epochs", "1"], 3e-3, "epoch"),
    "rwr_sparse": ("rwr.py", [*REWARD, "--sparse", "--num-inner-epochs", "1"], 3e-3, "epoch"),
    "braid_boot": ("braid.py", [*BRAID, "--conservatism", "boot"], 1e-3, "step"),
    "braid_bonus": ("braid.py", [*BRAID, "--conservatism", "bonus"], 1e-3, "step"),
    "braid_c0": ("braid.py", [*BRAID, "--c", "0"], 1e-3, "step"),
    # a reference row: TRL 0.23.1's DDPOTrainer on the same task, evaluated as ddpo.py is (needs TRL installed)
    "trl_ddpo": ("benchmarks/results/trl_ddpo_task.py", [*REWARD, "--estimator", "is"], 3e-2, "epoch"),
}
# not in the comparison: claim (e)'s second LoRA, trained for another reward, at the sizes of ddpo.py's learning test
# for it (64 samples an epoch in minibatches of 16; at the comparison's 16 in minibatches of 4 it did not learn)
PARTNER = {"ddpo_jpeg": ("ddpo.py", ["--reward", "jpeg_compressibility", "--estimator", "is"], 3e-2, "epoch")}
PARTNER_SIZES = ["--samples-per-epoch", "64", "--sample-batch-size", "32", "--train-batch-size", "16", "--num-epochs",
                 "20", "--sample-every", "5", "--save-every", "20"]  # fmt: skip
RUNS = METHODS | PARTNER
# claim (d): braid_boot at its best learning rate, one flag at a time from its defaults (c 1, kl-weight 0.01)
BRAID_SWEEP = {"c": [0.0, 0.5, 1.0, 2.0, 4.0], "kl_weight": [0.0, 0.01, 0.1, 1.0]}
# BRAID's tiny preset keeps the offline data's lower half (--offline-quantile 0.5), and its reward model needs 11
# examples (10 to fit, 1 to validate): 21 queries keep 11
BRAID_MIN_BUDGET = 21
# --quick: enough for BRAID's reward model; DRaFT takes 6 steps, DDPO and RWR 2 epochs
QUICK = dict(budget=24, batch=4, seeds=1, evals=2)


@dataclass
class Args:
    output_dir: Optional[str] = None
    """where the runs go, {output_dir}/{method}/lr{lr}/seed{seed}/ (default runs/compare; with --quick,
    runs/compare_quick, so that a smoke run never replaces the full run's folders)"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """which methods to run (names in METHODS)"""
    budget: int = 512
    """reward queries per run (one decoded image scored = one query; BRAID: its offline data size)"""
    batch: int = 4
    """images per optimizer step for DRaFT and BRAID (DRaFT-LV: batch / n trajectories, n x that many images) and
    per DDPO/RWR training minibatch; DDPO/RWR sample 4 x batch images per epoch"""
    seeds: int = 3
    """seeds per method at its best learning rate"""
    lr_factors: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    """the sweep: each method's default learning rate times these, on seed 0; the best final held-out reward wins"""
    extend: int = 2
    """if the best rate is at an edge of the sweep, up to this many more points past it (at the sweep's last ratio)"""
    evals: int = 8
    """held-out evaluations (sample grids) per run, besides the one at the start"""
    quick: bool = False
    """a smoke run: budget 24, batch 4, 1 seed, no sweep, 2 evaluations, then the summary into --output-dir"""
    pretrained_model: Optional[str] = None
    """another pipeline in place of assets/tiny-sd (the tests pass a random tiny one, to be quick)"""
    extra: str = ""
    """flags appended to every script's command line, e.g. --extra="--resolution 16 --num-steps 4" """
    summarize: bool = False
    """write {docs_dir}/RESULTS.md and {docs_dir}/results/*.png from the runs under --output-dir (no new runs)"""
    claims: bool = False
    """measure claims (b) and (e) (writes {output_dir}/claims.json; (e) needs a finished draft_k1 run)"""
    docs_dir: Optional[str] = None
    """where --summarize writes RESULTS.md and results/ (default docs; with --quick, --output-dir)"""
    draws: int = 256
    """--claims: gradient draws per estimator for claim (b)"""
    braid_sweep: bool = True
    """after the methods: claim (d)'s sweep of BRAID's --c and --kl-weight (seed 0, braid_boot's best learning rate)"""
    jobs: int = 1
    """methods run side by side (each one thread: --jobs 2 on 2 cores halves the time of the full run)"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS): on the tiny model a second thread gains ~10%, so 1 keeps the seconds
    comparable whatever else the machine does"""


def sizes(name: str, args: Args) -> tuple[list[str], int, int]:
    """The method's size flags for the budget, its number of steps or epochs, and its reward queries per unit."""
    script, _, _, counter = RUNS[name]
    if name in PARTNER:
        return PARTNER_SIZES, 20, 64
    if counter == "epoch":  # DDPO, RWR: samples_per_epoch images per epoch, trained on in minibatches of `batch`
        per_unit = 4 * args.batch
        flags = ["--samples-per-epoch", per_unit, "--sample-batch-size", per_unit, "--train-batch-size", args.batch]
    elif script == "draft_lv.py":  # n = 2 re-noised copies of batch / 2 trajectories: `batch` images scored
        per_unit, flags = args.batch, ["--batch-size", max(1, args.batch // 2)]
    else:
        per_unit, flags = args.batch, ["--batch-size", args.batch]
    units = max(2, args.budget // per_unit)
    if script == "braid.py":  # the offline data is the budget; it trains as many steps as DRaFT-K (0 online queries)
        flags += ["--offline-size", args.budget, "--reward-model-steps", 200 if args.quick else 1000]
    length = "--num-epochs" if counter == "epoch" else "--train-steps"
    every = max(2, units // args.evals)  # > 1: the first line of metrics.jsonl then carries the start's evaluation
    flags += [length, units, "--sample-every", every, "--save-every", units]
    return [str(f) for f in flags], units, per_unit


def run_dir(args: Args, name: str, lr: float, seed: int) -> str:
    return os.path.join(args.output_dir, name, f"lr{lr:g}", f"seed{seed}")


def read_run(folder: str) -> tuple[Optional[str], list[dict]]:
    """The run folder under `folder` (the script's own, named by its run name) and its metrics.jsonl lines."""
    runs = (
        [d for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
        if os.path.isdir(folder)
        else []
    )
    if not runs:
        return None, []
    path = os.path.join(folder, runs[-1], "metrics.jsonl")
    if not os.path.isfile(path):
        return os.path.join(folder, runs[-1]), []
    with open(path) as f:
        return os.path.join(folder, runs[-1]), [json.loads(line) for line in f if line.strip()]


def run_one(args: Args, name: str, lr: float, seed: int, folder: Optional[str] = None, more=()) -> str:
    """Runs `python script ...` for one (method, lr, seed) unless it already finished; returns its run folder.
    `folder` and `more` (flags) for the runs outside the comparison: claim (d)'s sweep, claim (e)'s second LoRA."""
    script, flags, _, counter = RUNS[name]
    size_flags, units, _ = sizes(name, args)
    folder = folder or run_dir(args, name, lr, seed)
    found, lines = read_run(folder)
    if lines and lines[-1][counter] == units:
        print(f"skip {name} lr {lr:g} seed {seed}: finished ({found})")
        return found
    shutil.rmtree(folder, ignore_errors=True)  # half-written: start it again
    os.makedirs(folder)
    command = [sys.executable, script, *TASK, *flags, *map(str, more), *size_flags, "--learning-rate", f"{lr:g}",
               "--seed", str(seed), "--exp-name", name, "--output-dir", os.path.abspath(folder),
               *shlex.split(args.extra)]  # fmt: skip
    if args.pretrained_model:
        command += ["--pretrained-model", args.pretrained_model]
    print(f"run {name} lr {lr:g} seed {seed}: {' '.join(command[1:])}", flush=True)
    start, times = time.time(), []
    with open(os.path.join(folder, "log.txt"), "w") as log:
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | threads)
        while process.poll() is None:  # note when each metrics line appears: the wall-clock of each step
            time.sleep(0.25)
            _, lines = read_run(folder)
            times += [time.time() - start] * (len(lines) - len(times))
    found, lines = read_run(folder)
    times += [time.time() - start] * (len(lines) - len(times))
    if process.returncode != 0 or not lines or lines[-1][counter] != units:
        raise RuntimeError(f"{name} lr {lr:g} seed {seed} failed (exit {process.returncode}): see {folder}/log.txt")
    with open(os.path.join(found, "wall_clock.json"), "w") as f:
        json.dump({"seconds": times, "total": time.time() - start}, f)
    return found


def held_out_reward(grid_png: str) -> float:
    """Mean colourfulness of the images of a sample grid (4 columns, 2 rows of equal squares)."""
    from PIL import Image

    from common.rewards import make_reward

    grid = torch.from_numpy(np.array(Image.open(grid_png).convert("RGB"))).permute(2, 0, 1).float() / 255
    size = grid.shape[2] // 4
    tiles = grid.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)
    return make_reward("colorfulness")(tiles).mean().item()


def curve(args: Args, name: str, folder: str) -> dict:
    """One run's held-out reward at each evaluation, against reward queries and seconds, from its files."""
    counter, (_, units, per_unit) = RUNS[name][3], sizes(name, args)
    _, lines = read_run(os.path.dirname(folder))
    with open(os.path.join(folder, "wall_clock.json")) as f:
        clock = json.load(f)
    points = []
    for grid in sorted(os.listdir(os.path.join(folder, "samples"))):
        unit = int(grid.split("_")[1].split(".")[0])
        seconds = clock["seconds"][unit - 1] if unit else 0.0
        points.append((unit * per_unit, seconds, held_out_reward(os.path.join(folder, "samples", grid))))
    speed = statistics.median(line["images_per_sec"] for line in lines)
    last = lines[-1]
    extra = {k: [line.get(k) for line in lines] for k in ("true_reward_mean", "proxy_reward_mean", "offline_best")}
    return dict(points=points, units=units, total_s=clock["total"], images_per_sec=speed, last=last, **extra,
                eval_reward_mean=[line["eval_reward_mean"] for line in lines], counter=counter)  # fmt: skip


def final(points) -> float:
    return points[-1][2]


def compare(args: Args) -> None:
    """The sweep on seed 0, then the seeds at each method's best learning rate, `--jobs` methods at a time; then
    claim (d)'s BRAID sweep (after braid_boot) and claim (e)'s second LoRA (after draft_k1). Writes sweep.json."""
    factors = [1.0] if args.quick else args.lr_factors
    path = os.path.join(args.output_dir, "sweep.json")
    lock, failed = threading.Lock(), []

    def method(name: str) -> None:  # one method's runs, one after the other
        lrs = [METHODS[name][2] * f for f in factors]
        try:
            results = {lr: final(curve(args, name, run_one(args, name, lr, 0))["points"]) for lr in lrs}
            for _ in range(args.extend if len(factors) > 1 else 0):  # the best at an edge: one more point past it
                best, ratio = best_lr(results), factors[-1] / factors[-2]
                if best not in (min(results), max(results)):
                    break
                lr = best * ratio if best == max(results) else best / ratio
                results[lr] = final(curve(args, name, run_one(args, name, lr, 0))["points"])
        except RuntimeError as e:  # one method's failure leaves the others' runs to do
            print(e)
            failed.append(name)
            return
        best = best_lr(results)
        extra = []  # the claims' runs that need this method's best learning rate or run
        if name == "braid_boot" and args.braid_sweep and not args.quick:
            extra = [("braid_boot", best, braid_point(args, flag, value), f"braid sweep {flag} {value:g}")
                     for flag, values in BRAID_SWEEP.items() for value in values]  # fmt: skip
        if name == "draft_k1" and not args.quick:
            extra = [("ddpo_jpeg", PARTNER["ddpo_jpeg"][2], {"folder": os.path.join(args.output_dir, "claim_e_jpeg")},
                      "ddpo_jpeg")]  # fmt: skip
        runs = [(name, best, {"seed": seed}, name) for seed in range(1, args.seeds)] + extra
        for run_name, lr, where, label in runs:
            try:
                run_one(args, run_name, lr, where.pop("seed", 0), **where)
            except RuntimeError as e:
                print(e)
                failed.append(label)
        with lock:  # read first: another process (or method) may have written its own lines
            written = json.load(open(path))["sweep"] if os.path.isfile(path) else {}
            entry = {"lrs": {f"{lr:g}": r for lr, r in sorted(results.items())}, "best_lr": best}
            with open(path, "w") as f:
                json.dump({"args": vars(args), "sweep": written | {name: entry}}, f, indent=1)

    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess: threads only wait for them
        list(pool.map(method, args.methods))
    if failed:
        fail(f"{len(failed)} of the runs failed: {', '.join(failed)} (each one's log.txt says why)")


def best_lr(results: dict) -> float:
    return max(results, key=lambda lr: results[lr] if math.isfinite(results[lr]) else -math.inf)


def braid_point(args: Args, flag: str, value: float) -> dict:
    """One point of claim (d)'s sweep: its folder and flags (the other flag at its default)."""
    c, kl = (value, 0.01) if flag == "c" else (1.0, value)
    folder = os.path.join(args.output_dir, "braid_sweep", f"c{c:g}_kl{kl:g}")
    return dict(folder=folder, more=["--c", f"{c:g}", "--kl-weight", f"{kl:g}"])


# ----------------------------------------------------------------------------------------------------------------------
# the summary: docs/RESULTS.md and docs/results/*.png, from the runs' files only


def collect(args: Args) -> dict:
    """For each method that has runs: its sweep (seed 0's final held-out reward per learning rate) and the curves of
    its runs at the best learning rate (every seed found)."""
    results = {}
    for name in METHODS:
        base = os.path.join(args.output_dir, name)
        if not os.path.isdir(base):
            continue
        sweep, curves = {}, {}
        for lr_dir in sorted(os.listdir(base)):
            for seed_dir in sorted(os.listdir(os.path.join(base, lr_dir))):
                found, lines = read_run(os.path.join(base, lr_dir, seed_dir))
                if not lines or lines[-1][METHODS[name][3]] != sizes(name, args)[1]:
                    continue  # unfinished
                curves.setdefault(lr_dir, []).append(curve(args, name, found) | {"folder": found})
                if seed_dir == "seed0":
                    sweep[lr_dir] = final(curves[lr_dir][-1]["points"])
        if sweep:
            best = max(sweep, key=lambda lr: sweep[lr] if math.isfinite(sweep[lr]) else -math.inf)
            results[name] = {"sweep": sweep, "best": best, "runs": curves[best]}
    return results


def braid_sweep(args: Args) -> list[dict]:
    """Claim (d)'s finished sweep points: for each, the held-out reward (true, from the grids) at the start and the
    end, and over the last 5 training batches the true reward, the proxy (the heads' mean) and the KL."""
    points = []
    for flag, values in BRAID_SWEEP.items():
        for value in values:
            found, lines = read_run(braid_point(args, flag, value)["folder"])
            if not lines or lines[-1]["step"] != sizes("braid_boot", args)[1]:
                continue
            last = lines[-5:]
            held_out = curve(args, "braid_boot", found)["points"]
            state = os.path.join(found, "checkpoints", f"step_{lines[-1]['step']:06d}", "state.pt")
            points.append({"flag": flag, "value": value, "start": held_out[0][2], "end": final(held_out),
                           "true": statistics.mean(x["true_reward_mean"] for x in last),
                           "proxy": statistics.mean(x["proxy_reward_mean"] for x in last),
                           "kl": statistics.mean(x["kl"] for x in last),
                           "offline_best": lines[-1]["offline_best"],
                           "lr": torch.load(state, weights_only=False)["args"]["learning_rate"]})  # fmt: skip
    return points


def plot_braid_sweep(points: list[dict], out: str, plt) -> str:
    """Claim (d): proxy and true reward at the end of training against --c and against --kl-weight."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, flag in zip(axes, BRAID_SWEEP):
        row = [p for p in points if p["flag"] == flag]
        x = range(len(row))  # evenly spaced, labelled by value (the values span 0 to 100x)
        for key, label, style in [("proxy", "proxy (heads' mean), last 5 batches", "o-"),
                                  ("true", "true reward, last 5 batches", "s-"),
                                  ("end", "true reward, held-out grid at the end", "^-")]:  # fmt: skip
            ax.plot(x, [p[key] for p in row], style, label=label)
        if row:
            ax.axhline(row[0]["offline_best"], color="grey", ls="--", label="offline data's best (true)")
            ax.axhline(row[0]["start"], color="grey", ls=":", label="held-out grid at the start")
        ax.set_xticks(list(x), [f"{p['value']:g}" for p in row])
        ax.set_xlabel(f"--{flag.replace('_', '-')} (the other flag at its default)")
        ax.set_ylabel("colourfulness")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "braid_sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: dict, out: str, sweep_points=()) -> list[str]:
    """Held-out reward against reward queries and against seconds, all methods in one figure each (seeds: the mean,
    and a band from the lowest to the highest seed); before/after grids per method. Returns the files written."""
    from PIL import Image

    written = []
    for name, result in results.items():  # the grids: start (left) and end (right), 3x nearest-neighbour
        samples = os.path.join(result["runs"][0]["folder"], "samples")
        files = sorted(os.listdir(samples))  # step_000000.png (epoch_...) first, the last step's last
        first, last = (Image.open(os.path.join(samples, f)).convert("RGB") for f in (files[0], files[-1]))
        both = Image.new("RGB", (first.width * 2 + 8, first.height), "white")
        both.paste(first, (0, 0))
        both.paste(last, (first.width + 8, 0))
        path = os.path.join(out, f"samples_{name}.png")
        both.resize((both.width * 3, both.height * 3), Image.NEAREST).save(path)
        written.append(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r benchmarks/results/requirements-plots.txt): no curves")
        return written
    for axis, label, file in [(0, "reward queries", "reward_vs_queries.png"), (1, "seconds (2 shared CPU cores)",
                                                                              "reward_vs_seconds.png")]:  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, result in results.items():
            runs = [np.array(r["points"]) for r in result["runs"]]
            n = min(len(r) for r in runs)
            x = np.mean([r[:n, axis] for r in runs], 0)
            y = np.stack([r[:n, 2] for r in runs])
            style = "--" if name.startswith("braid") else "-"
            (line,) = ax.plot(x, y.mean(0), style, marker=".", label=f"{name} (lr {result['best'][2:]})")
            if len(runs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
        braid = " (BRAID, dashed: all its offline labels come first; drawn against its training progress)"
        ax.set_xlabel(label + (braid if axis == 0 else ""))
        ax.set_ylabel("held-out colourfulness (4 prompts x 2 seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, file), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out, file))
    if sweep_points:
        written.append(plot_braid_sweep(sweep_points, out, plt))
    return written


# ----------------------------------------------------------------------------------------------------------------------
# claims (b) and (e), measured outside the scripts


def load_task(lora: Optional[str], pretrained_model: str):
    """The tiny model with a rank-8 LoRA (DRaFT's default rank) at fixed weights: a trained one, or a seeded random
    one (B is zero at initialisation, which would make every gradient with respect to A zero)."""
    from common.models import load_model
    from common.rewards import make_reward

    model = load_model(pretrained_model, resolution=32, num_steps=10)
    params = model.add_lora(8)
    if lora:
        model.load_lora(lora)
    else:
        torch.manual_seed(0)
        for p in params:
            p.data.normal_(0, 0.02)
    train, _ = split_prompts(load_prompts("shapes"))
    return model, params, train, make_reward("colorfulness")


def gradient_draws(task, estimator: str, images: int, draws: int) -> torch.Tensor:
    """`draws` independent gradient estimates (flattened LoRA gradients of the loss -mean reward) that each score
    `images` decoded images: "k1" (DRaFT-1 on `images` trajectories) or "lv2" (DRaFT-LV, n = 2 re-noised copies of
    images / 2 trajectories; the loss divided by n, so both estimate a gradient of the mean reward). The same steps
    as draft_k.py and draft_lv.py, written out here (the scripts keep theirs in their training loop)."""
    from common.models import Conditioning
    from common.prompts import sample_prompts
    from common.sampling import ddim_step, randn

    model, params, train, reward_fn = task
    schedule, last = model.schedule(10), 9
    rng, grads = torch.Generator().manual_seed(1 if estimator == "k1" else 2), []

    def step(i, latents, cond):  # DDIM at eta 0, guidance 5
        return ddim_step(schedule, i, model.predict(latents, schedule.timesteps[i], cond, 5.0), latents).latents

    for _ in range(draws):
        n = 2 if estimator == "lv2" else 1
        batch = images // n
        cond = model.encode(sample_prompts(train, batch, rng))
        x1 = model.initial_latents(batch, rng)
        with torch.no_grad():  # the first 9 of the 10 DDIM steps, no gradient: x_1
            for i in range(last):
                x1 = step(i, x1, cond)
            if estimator == "lv2":  # x_0 without gradient, then n re-noised copies x_1^i, each taken back to x_0^i
                x0 = step(last, x1, cond)
        if estimator == "lv2":
            x1 = torch.cat(
                [schedule.alphas[last] * x0 + schedule.sigmas[last] * randn(x0.shape, rng) for _ in range(n)]
            )
            cond = Conditioning.cat([cond] * n)
        loss = -reward_fn(model.decode(step(last, x1, cond))).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(grads)  # (draws, LoRA parameters)


def claim_b(task, draws: int, images: int = 4) -> dict:
    """DRaFT-LV (n = 2) against DRaFT-1 with twice the trajectories: the same reward queries per estimate."""
    out = {"images_per_estimate": images, "draws": draws}
    for estimator in ("k1", "lv2"):
        start = time.time()
        g = gradient_draws(task, estimator, images, draws)
        mean = g.mean(0)
        variance = ((g - mean) ** 2).sum(1).mean().item()  # E ||g - E g||^2, the trace of the covariance
        norm_sq = mean.pow(2).sum().item()
        out[estimator] = {"total_variance": variance, "mean_norm_sq": norm_sq,
                          "relative_variance": variance / norm_sq, "seconds": time.time() - start}  # fmt: skip
        out[estimator + "_mean"] = mean
    k1, lv = out.pop("k1_mean"), out.pop("lv2_mean")
    out["cosine_of_means"] = torch.nn.functional.cosine_similarity(k1, lv, 0).item()
    return out


def claim_e(run: str, pretrained_model: str, partner: Optional[str] = None, scales=(0, 0.25, 0.5, 0.75, 1, 1.25, 1.5),
            mixes=((0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5), (1, 0.5), (0.5, 1))) -> dict:  # fmt: skip
    """The trained LoRA in plain diffusers at scales 0 to 1.5: held-out colourfulness (4 prompts x 4 seeds). With
    `partner` (a LoRA trained for JPEG compressibility), both loaded as two adapters and mixed by `set_adapters`
    weights: both rewards at each pair of weights (colourfulness LoRA, JPEG LoRA)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from common.rewards import make_reward

    pipe = StableDiffusionPipeline.from_pretrained(pretrained_model, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the scripts' sampler
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run, adapter_name="draft")
    held_out = split_prompts(load_prompts("shapes"))[1] * 4
    reward_fn, jpeg_fn, rewards = make_reward("colorfulness"), make_reward("jpeg_compressibility"), {}

    def images():
        return pipe(held_out, num_inference_steps=10, guidance_scale=5.0, height=32, width=32, output_type="pt",
                    generator=[torch.Generator().manual_seed(i // 4) for i in range(16)]).images  # fmt: skip

    for scale in scales:
        pipe.set_adapters("draft", scale)
        rewards[f"{scale:g}"] = reward_fn(images()).mean().item()
    out = {"run": run, "reward_by_scale": rewards}
    if partner:
        pipe.load_lora_weights(partner, adapter_name="jpeg")
        out |= {"partner": partner, "mix": []}
        for w_colour, w_jpeg in mixes:
            pipe.set_adapters(["draft", "jpeg"], [w_colour, w_jpeg])
            x = images()
            out["mix"].append({"weights": [w_colour, w_jpeg], "colorfulness": reward_fn(x).mean().item(),
                               "jpeg_compressibility": jpeg_fn(x).mean().item()})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# RESULTS.md


HAND = "<!-- written by hand: {} -->"  # the start of a block of RESULTS.md that people write; --summarize keeps it
END = "<!-- end -->"


def hand_written(name: str, existing: str) -> list[str]:
    """The block of RESULTS.md named `name` that people write under the generated numbers (what the figures show,
    why a claim fails here), as it stands in `existing` (the file before this summary), between its markers; a new
    block says that it has yet to be written. The generator writes numbers and verdicts computed from them, never a
    conclusion of its own."""
    start = HAND.format(name)
    if start in existing and END in existing.split(start, 1)[1]:
        return [start, existing.split(start, 1)[1].split(END, 1)[0].strip("\n"), END]
    return [start, "(Not written yet: what these numbers show, in words, after reading them.)", END]


def verdict(ok: Optional[bool]) -> str:
    return {True: "**holds here**", False: "**does not hold here**", None: "**not measurable here**"}[ok]


def gain_per_query(result: dict) -> float:
    """Held-out reward gained per 100 reward queries, the mean over seeds."""
    return statistics.mean(100 * (final(r["points"]) - r["points"][0][2]) / r["points"][-1][0] for r in result["runs"])


def run_seconds(output_dir: str) -> float:
    """The seconds all runs under `output_dir` took (their wall_clock.json totals: sweeps and extra runs included)."""
    total = 0.0
    for folder, _, files in os.walk(output_dir):
        if "wall_clock.json" in files:
            with open(os.path.join(folder, "wall_clock.json")) as f:
                total += json.load(f)["total"]
    return total


def results_md(
    args: Args, results: dict, claims: dict, figures: list[str], sweep_points: list[dict], existing: str = ""
) -> str:
    seeds = max(len(r["runs"]) for r in results.values())
    n_lrs = max(len(r["sweep"]) for r in results.values())
    budget = sorted({sizes(name, args)[1] * sizes(name, args)[2] for name in results})
    full = Args()
    fewest = min(len(r["runs"]) for r in results.values())
    is_full = fewest >= full.seeds and n_lrs >= len(full.lr_factors) and budget == [full.budget]
    lines = [
        "# Results: the six methods side by side on one task",
        "",
        "## The comparison on the reward alone",
        "",
        "Written by `python benchmarks/results/compare.py --summarize` from the runs' own files (metrics.jsonl,",
        "samples/, wall_clock.json). Task: the shipped tiny model (`assets/tiny-sd`, 32 px), reward `colorfulness`,",
        "the `shapes` prompts (86 for training, 4 held out as the scripts split them), 10 DDIM steps and guidance 5",
        "for every method, on the CPU with one torch thread per run. One reward query is one decoded image scored;",
        "BRAID's budget is its offline data (queries of the labeler), 0 online queries.",
        "",
        f"**This run: {fewest if fewest == seeds else f'{fewest}-{seeds}'} seed(s) at each method's best learning"
        f" rate, chosen by a sweep of up to {n_lrs} rates on seed 0; {budget} reward queries per run;"
        f" {run_seconds(args.output_dir) / 60:.0f} min of run time in all (sweeps and the runs of claims (d) and"
        " (e) included).**"
        + (
            " This is the full run: `python benchmarks/results/compare.py --jobs 2` (two one-thread runs at a time on 2"
            " cores: about half that time), then `--claims`, then `--summarize`."
            if is_full
            else f" The full run ({full.seeds} seeds, {len(full.lr_factors)}-point sweep, {full.budget} queries) is"
            " `python benchmarks/results/compare.py`."
        ),
        "",
        "The held-out reward is the colourfulness of the sample grids (4 held-out prompts x 2 fixed seeds, read back",
        "from the PNGs: the same number for every method; BRAID's own `eval_reward_mean` is its conservative reward).",
        "DRaFT, DDPO and RWR evaluate with DDIM eta 0, BRAID with its eta 1 and a fixed seed, so BRAID's start differs",
        "from the others'. Spreads are the standard deviation over seeds. The seconds are one thread's on a 2-core",
        "machine whose other core did other work part of the time: they rank the methods' cost per query only",
        "roughly (docs/BENCHMARKS.md measures speed under control). `trl_ddpo` is a reference row: TRL 0.23.1's",
        "`DDPOTrainer` on the same task with ddpo.py's settings (`benchmarks/results/trl_ddpo_task.py`), evaluated by",
        "the same grids.",
        "",
        "| method | lr | seeds | reward queries (online / offline) | held-out start | held-out end | gain per 100"
        " queries | wall-clock (s) | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        runs, queries = result["runs"], sizes(name, args)[1] * sizes(name, args)[2]
        online = f"0 / {queries}" if name.startswith("braid") else f"{queries} / 0"
        label = f"{name} (reference)" if name == "trl_ddpo" else name
        start, end = mean_sd([r["points"][0][2] for r in runs]), mean_sd([final(r["points"]) for r in runs])
        seconds, speed = mean_sd([r["total_s"] for r in runs]), mean_sd([r["images_per_sec"] for r in runs])
        lines.append(
            f"| {label} | {result['best'][2:]} | {len(runs)} | {online} | {start} | {end} |"
            f" {gain_per_query(result):+.1f} | {seconds} | {speed} |"
        )
    header = "| method | " + " | ".join(f"lr {i + 1}" for i in range(n_lrs)) + " |"
    lines += ["", "Learning-rate sweep (seed 0, final held-out reward; the best is kept):", "", header,
              "|---|" + "---|" * n_lrs]  # fmt: skip
    for name, result in results.items():
        cells = [
            f"{lr[2:]}: {value:.1f}" for lr, value in sorted(result["sweep"].items(), key=lambda x: float(x[0][2:]))
        ]
        lines.append(f"| {name} | " + " | ".join(cells + [""] * (n_lrs - len(cells))) + " |")
    for file in figures:
        if file.endswith(".png") and os.path.basename(file).startswith("reward_vs_"):
            lines += ["", f"![{os.path.basename(file)}](results/{os.path.basename(file)})"]
    lines += ["", "## Samples before and after", "", "Held-out prompts (columns) x 2 seeds (rows); left: step 0, right:"
              " the last step, of seed 0's run. 3x enlarged.", "", *hand_written("samples", existing), ""]  # fmt: skip
    for name in results:
        lines.append(f"**{name}**  \n![{name}](results/samples_{name}.png)  ")
    lines += ["", "## The papers' claims, checked", ""] + claims_md(results, claims, sweep_points)
    lines += ["", *hand_written("claims", existing)]
    edge = [n for n, r in results.items() if r["best"] in (max(r["sweep"], key=lambda x: float(x[2:])),
                                                             min(r["sweep"], key=lambda x: float(x[2:])))]  # fmt: skip
    if edge:
        lines += ["", f"Still at an edge of their sweep, so perhaps better further out: {', '.join(edge)}."]
    return "\n".join(lines) + "\n"


def per_seed(result: dict, key: str, first: bool) -> float:
    """The mean over seeds of a training metric's mean over the first (or last) 5 steps."""
    return statistics.mean(statistics.mean(r[key][:5] if first else r[key][-5:]) for r in result["runs"])


def claims_md(results: dict, claims: dict, sweep_points: list[dict]) -> list[str]:
    g = {name: gain_per_query(result) for name, result in results.items()}
    out = []
    if {"draft_k1", "draft_full"} <= set(g):
        ok = g["draft_k1"] > g["draft_full"]
        out.append(
            f"(a) DRaFT-1 gains more held-out reward per query than full backpropagation: {verdict(ok)}"
            f" ({g['draft_k1']:+.1f} against {g['draft_full']:+.1f} per 100 queries, the mean over seeds)."
        )
    else:
        out.append(f"(a) DRaFT-1 against full backpropagation: {verdict(None)} (runs missing).")
    b = claims.get("b")
    if b:
        ratio = b["lv2"]["total_variance"] / b["k1"]["total_variance"]
        out.append(
            f"\n(b) DRaFT-LV (n = 2) has a lower-variance gradient than DRaFT-1 with twice the trajectories (both"
            f" {b['images_per_estimate']} reward queries per estimate, {b['draws']} draws each, fixed LoRA weights):"
            f" {verdict(ratio < 1)}. Total variance E||g - Eg||^2: LV {b['lv2']['total_variance']:.3g}, K = 1"
            f" {b['k1']['total_variance']:.3g} (ratio {ratio:.2f}); relative to the squared norm of the mean gradient:"
            f" LV {b['lv2']['relative_variance']:.2f}, K = 1 {b['k1']['relative_variance']:.2f}; cosine between the two"
            f" mean gradients {b['cosine_of_means']:.2f}. Time per draw: LV {b['lv2']['seconds'] / b['draws']:.2f} s,"
            f" K = 1 {b['k1']['seconds'] / b['draws']:.2f} s (LV samples half as many full chains)."
            f" At equal trajectories instead (LV's n copies cost reward queries and last steps, not chains), K = 1"
            f" with {b['images_per_estimate'] // 2} trajectories has twice the variance of the measured"
            f" {b['images_per_estimate']} (the trajectories of a batch are independent draws), about"
            f" {2 * b['k1']['total_variance']:.3g}: LV is {'lower' if ratio < 2 else 'not lower'} at equal"
            f" trajectories (ratio {ratio / 2:.2f})."
        )
        if {"draft_lv2", "draft_k1"} <= set(g):  # both score 4 images a step: per query is per step
            ahead = verdict(g["draft_lv2"] > g["draft_k1"])
            out.append(f" Reward per step (both runs score 4 images a step): LV {g['draft_lv2']:+.1f}, K = 1"
                       f" {g['draft_k1']:+.1f} per 100 queries; LV ahead: {ahead}.")  # fmt: skip
    else:
        out.append(f"\n(b) DRaFT-LV's gradient variance: {verdict(None)} (run `--claims`).")
    drafts = [g[n] for n in ("draft_full", "draft_k1", "draft_lv2") if n in g]
    others = [g[n] for n in ("ddpo_is", "ddpo_sf", "rwr_softmax", "rwr_sparse") if n in g]
    if drafts and others:
        ok = min(drafts) > 2 * max(others) and min(drafts) > 0
        out.append(f"\n(c) DRaFT beats DDPO and RWR per reward query by a wide margin (every DRaFT variant more than"
                   f" twice the best of DDPO/RWR): {verdict(ok)}; the weakest DRaFT variant gains"
                   f" {min(drafts) / max(others):.2f}x the best of DDPO/RWR (per 100 queries: "
                   + ", ".join(f"{n} {v:+.1f}" for n, v in g.items() if not n.startswith("braid")) + ").")  # fmt: skip
    else:
        out.append(f"\n(c) DRaFT against DDPO and RWR: {verdict(None)} (runs missing).")
    if "ddpo_is" in g and {"rwr_softmax", "rwr_sparse"} & set(g):
        ok = g["ddpo_is"] > max(g.get("rwr_softmax", -math.inf), g.get("rwr_sparse", -math.inf))
        out.append(f" DDPO-IS beats RWR: {verdict(ok)}.")
    out += claim_d_md(results, sweep_points)
    e = claims.get("e")
    if e:
        cells = ", ".join(f"{s}: {v:.1f}" for s, v in e["reward_by_scale"].items())
        values = list(e["reward_by_scale"].values())
        ok = all(b >= a for a, b in zip(values, values[1:]))
        out.append(f"\n(e) The trained DRaFT-1 LoRA (seed 0, best learning rate) in plain diffusers"
                   f" (`load_lora_weights` + `set_adapters`), held-out colourfulness (4 prompts x 4 seeds) by scale:"
                   f" {cells}. Reward rises with the scale throughout, past 1: {verdict(ok)}.")  # fmt: skip
        if e.get("mix"):
            out += ["", "Two LoRAs for two rewards, mixed by `set_adapters` weights: the DRaFT-1 colourfulness LoRA"
                    " and a DDPO-IS LoRA trained for JPEG compressibility (`ddpo.py --reward jpeg_compressibility`,"
                    " 20 epochs of 64 samples, the sizes of its learning test; the reward is minus the JPEG size in"
                    " kB, so higher is smaller files). Held-out"
                    " images (4 prompts x 4 seeds):", "", "| weights (colour, JPEG) | colourfulness | JPEG"
                    " compressibility |", "|---|---|---|"]  # fmt: skip
            for m in e["mix"]:
                out.append(f"| {m['weights'][0]:g}, {m['weights'][1]:g} | {m['colorfulness']:.1f} |"
                           f" {m['jpeg_compressibility']:.3f} |")  # fmt: skip
    else:
        out.append(f"\n(e) LoRA scaling: {verdict(None)} (run `--claims` after a draft_k1 run).")
    return out


def claim_d_md(results: dict, sweep_points: list[dict]) -> list[str]:
    """Claim (d): BRAID's conservative runs against the offline data's best, --c 0's proxy and true reward, and the
    sweep of --c and --kl-weight (the training batches' true reward: the labeler, without its label noise)."""
    out = []
    if not {"braid_boot", "braid_bonus", "braid_c0"} & set(results):
        return [f"\n(d) BRAID: {verdict(None)} (runs missing)."]
    for name in ("braid_boot", "braid_bonus"):
        if name in results:
            runs = results[name]["runs"]
            above = sum(statistics.mean(r["true_reward_mean"][-5:]) > r["offline_best"][-1] for r in runs)
            end, best = per_seed(results[name], "true_reward_mean", False), per_seed(results[name], "offline_best", 0)
            ok = verdict(above == len(runs))
            out.append(f"\n(d) {name} ends above the offline data's best on the true reward: {ok}"
                       f" ({above} of {len(runs)} seeds; true reward of the last 5 training batches {end:.1f}, the"
                       f" offline data's best {best:.1f}, means over seeds).")  # fmt: skip
    if "braid_c0" in results:
        c0 = results["braid_c0"]
        proxy = per_seed(c0, "proxy_reward_mean", True), per_seed(c0, "proxy_reward_mean", False)
        true = per_seed(c0, "true_reward_mean", True), per_seed(c0, "true_reward_mean", False)
        ok = proxy[1] > proxy[0] and true[1] < true[0]
        out.append(f"\n(d) braid --c 0 raises the proxy and lowers the true reward: {verdict(ok)} (means over seeds of"
                   f" the first and last 5 training batches: proxy {proxy[0]:.1f} -> {proxy[1]:.1f}, true"
                   f" {true[0]:.1f} -> {true[1]:.1f}: the proxy ends {proxy[1] - true[1]:+.1f} above the true"
                   f" reward).")  # fmt: skip
    if sweep_points:
        lrs = ", ".join(sorted({f"{p['lr']:g}" for p in sweep_points}))
        best = results["braid_boot"]["best"][2:] if "braid_boot" in results else "?"
        which = "its best" if lrs == best else f"its best is {best}"
        out += ["", f"The sweep (braid_boot, seed 0, learning rate {lrs}: {which}; one flag at a time from c 1,"
                " kl-weight 0.01): the last 5 training batches' proxy (the heads' mean), true reward and KL, and the"
                " held-out grid's true reward at the end.", "",
                "![braid_sweep.png](results/braid_sweep.png)", "",
                "| flag | value | proxy | true | held-out end | KL | proxy - true |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in sweep_points:
            out.append(f"| {p['flag']} | {p['value']:g} | {p['proxy']:.1f} | {p['true']:.1f} | {p['end']:.1f} |"
                       f" {p['kl']:.3g} | {p['proxy'] - p['true']:+.1f} |")  # fmt: skip
    return out


FRONTIER = "## Reward at equal prompt fidelity"  # frontier.py's section, which RESULTS.md leads with


def lead_with(results: str, section: str) -> str:
    """RESULTS.md's text with `section` (frontier.py's) right after its title, in place of an earlier one."""
    title, _, rest = results.partition("\n")
    start = rest.find(FRONTIER)
    if start >= 0:  # the old section runs to the next heading of its level
        end = rest.find("\n## ", start + len(FRONTIER))
        rest = rest[:start] + (rest[end + 1 :] if end >= 0 else "")
    return f"{title}\n\n{section.strip()}\n\n{rest.lstrip()}"


PROMPT_FOLLOWING = "## Flow-GRPO in miniature: prompt following on the tiny flow model"  # prompt_following.py's


def with_last_section(results: str, section: str) -> str:
    """RESULTS.md's text with `section` (prompt_following.py's) at its end, in place of an earlier one."""
    heading = section.split("\n", 1)[0]
    start = results.find(heading + "\n")
    if start >= 0:  # the old section runs to the next heading of its level
        end = results.find("\n## ", start + len(heading))
        results = results[:start] + (results[end + 1 :] if end >= 0 else "")
    return f"{results.rstrip()}\n\n{section.strip()}\n"


def summarize(args: Args) -> None:
    """{docs_dir}/RESULTS.md and its figures, from the finished runs under --output-dir (led by frontier.py's section,
    {docs_dir}/results/frontier.md, where there is one)."""
    results = collect(args)
    if not results:
        fail(f"no finished runs under {args.output_dir}: run `python benchmarks/results/compare.py` first")
    os.makedirs(os.path.join(args.docs_dir, "results"), exist_ok=True)
    sweep_points = braid_sweep(args)
    figures = plots(results, os.path.join(args.docs_dir, "results"), sweep_points)
    path = os.path.join(args.output_dir, "claims.json")
    claims = json.load(open(path)) if os.path.isfile(path) else {}
    for file in ("claims.json", "sweep.json"):  # the raw numbers, beside the figures
        if os.path.isfile(os.path.join(args.output_dir, file)) and args.docs_dir != args.output_dir:
            shutil.copy(os.path.join(args.output_dir, file), os.path.join(args.docs_dir, "results", file))
    path = os.path.join(args.docs_dir, "RESULTS.md")
    existing = open(path).read() if os.path.isfile(path) else ""  # its hand-written blocks are kept
    text = results_md(args, results, claims, figures, sweep_points, existing)
    frontier = os.path.join(args.docs_dir, "results", "frontier.md")
    if os.path.isfile(frontier):
        text = lead_with(text, open(frontier).read())
    prompt_following = os.path.join(args.docs_dir, "results", "prompt_following.md")
    if os.path.isfile(prompt_following):  # its section, with the hand-written block as RESULTS.md has it now
        generated = open(prompt_following).read().split(HAND.format("prompt_following"))[0]
        text = with_last_section(text, generated + "\n".join(hand_written("prompt_following", existing)) + "\n")
    with open(os.path.join(args.docs_dir, "RESULTS.md"), "w") as f:
        f.write(text)
    print(f"wrote {args.docs_dir}/RESULTS.md and {len(figures)} figures")


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.output_dir = args.output_dir or ("runs/compare_quick" if args.quick else "runs/compare")
    args.docs_dir = args.docs_dir or (args.output_dir if args.quick else "docs")  # a smoke run never writes docs/
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        fail(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    for name in ("jobs", "threads", "seeds", "budget", "batch", "evals"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    braid = [name for name in args.methods if METHODS[name][0] == "braid.py"]
    if braid and args.budget < BRAID_MIN_BUDGET and not (args.summarize or args.claims):
        fail(f"--budget must be at least {BRAID_MIN_BUDGET} with {', '.join(braid)}, got {args.budget}: BRAID's tiny"
             " preset keeps the lower half of its offline data, and its reward model needs 11 examples")  # fmt: skip
    if "trl_ddpo" in args.methods and importlib.util.find_spec("trl") is None and not args.summarize:
        print("TRL is not installed: no trl_ddpo row (pip install --no-deps -r benchmarks/peers/requirements-trl.txt)")
        args.methods.remove("trl_ddpo")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(args.threads)  # --claims computes in this process
    model = args.pretrained_model or os.path.join(ROOT, "assets/tiny-sd")
    if args.claims:
        path = os.path.join(args.output_dir, "claims.json")
        claims = json.load(open(path)) if os.path.isfile(path) else {}
        claims["b"] = claim_b(load_task(None, model), args.draws)
        sweep_path, lora = os.path.join(args.output_dir, "sweep.json"), None
        if os.path.isfile(sweep_path) and "draft_k1" in json.load(open(sweep_path))["sweep"]:
            lr = json.load(open(sweep_path))["sweep"]["draft_k1"]["best_lr"]
            lora = read_run(run_dir(args, "draft_k1", lr, 0))[0]
        partner = read_run(os.path.join(args.output_dir, "claim_e_jpeg"))[0]
        if lora and os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
            claims["e"] = claim_e(lora, model, partner if partner and os.path.isfile(
                os.path.join(partner, "pytorch_lora_weights.safetensors")) else None)  # fmt: skip
        with open(path, "w") as f:
            json.dump(claims, f, indent=1)
        print(json.dumps(claims, indent=1))
    elif args.summarize:
        summarize(args)
    else:
        start = time.time()
        compare(args)
        print(f"done in {time.time() - start:.0f} s")
        if args.quick:
            summarize(args)
        else:
            print(f"then: python benchmarks/results/compare.py --summarize --output-dir {args.output_dir}")
