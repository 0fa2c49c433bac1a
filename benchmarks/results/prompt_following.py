"""Flow-GRPO in miniature: does reinforcement learning raise a flow model's prompt following, and which recipes pay?

    python benchmarks/results/prompt_following.py --jobs 2        # the runs: 9 settings x 3 seeds, a thread each
    python benchmarks/results/prompt_following.py --summarize     # the last section of docs/RESULTS.md, and
                                                                  # docs/results/prompt_following.{json,md,png}

The task: the shipped flow model `assets/tiny-sd3` (an SD 3 pipeline at 32 px), which draws its prompts' colours but
not their shapes (its shapes are blobs that common.shapes.describe reads as a circle, a square or a triangle about
as often as chance), and the reward `prompt_following`, the share of the prompt's shape, colour and background that
the image shows (GenEval's idea in the tiny world). Training prompts: `shapes_seen`, the 60 shapes prompts whose
colour-shape pair is not held out; the evaluations sample `shapes_unseen`, the 30 whose pair (a third of them) never
occurs in training, at eta 0 from fixed noise (2 images a prompt), so a gain there is generalisation, not memory.
The measure: the share of held-out images that follow all three parts of their prompt (the runs' eval_fidelity),
against reward queries and against the training's seconds on one CPU thread (the runs' own images_per_sec).

The settings: `grpo_is` is Flow-GRPO's loop on our DDIM step (group advantages, G = 8, PPO's clipped ratio, 2
optimizer steps an epoch as in its code); beside it DDPO's per-prompt advantages (G = 1), REINFORCE, a KL weight,
RWR; then `grpo_is` with one recipe each: Flow-GRPO's own step (a = 0.7), a window of 2 noisy steps placed at
random, sampling and training without guidance, an EMA of the LoRA. 6 sampling steps, guidance 5 (also in every
evaluation), 64 images an epoch (8 prompts x 8), 16 epochs: 1024 reward queries a run.
"""

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.results import compare  # noqa: E402  (the repository's root is on the path only from here)
from common.cli import fail  # noqa: E402

TASK = ["--preset", "tiny", "--pretrained-model", "assets/tiny-sd3", "--reward", "prompt_following", "--prompts",
        "shapes_seen", "--validation-prompts", "shapes_unseen", "--num-steps", "6", "--guidance-scale", "5",
        "--samples-per-epoch", "64", "--sample-batch-size", "32", "--save-every", "1000"]  # fmt: skip
GRPO = [
    "ddpo.py",
    "--group-size",
    "8",
    "--train-batch-size",
    "16",
    "--grad-accum-steps",
    "2",
    "--learning-rate",
    "1e-2",
]
# name: (the script and its flags, what it is)
SETTINGS = {
    "grpo_is": (GRPO, "DDPO-IS with group advantages, G = 8 (Flow-GRPO's loop, our DDIM step at eta 1)"),
    "ddpo_is": (GRPO[:1] + GRPO[3:], "DDPO-IS with DDPO's per-prompt advantages (G = 1)"),
    "grpo_sf": ([*GRPO, "--estimator", "sf"], "DDPO-SF (REINFORCE) with G = 8: one optimizer step an epoch"),
    "grpo_is_kl": ([*GRPO, "--kl-weight", "0.1"], "grpo_is with the KL to the pretrained policy, weight 0.1"),
    "rwr": (
        ["rwr.py", "--train-batch-size", "32", "--num-inner-epochs", "2", "--learning-rate", "3e-3", "--beta", "10"],
        "RWR, weights 64 softmax(10 r) over the round (r in [0, 1])",
    ),  # fmt: skip
    "flow_grpo_step": ([*GRPO, "--sampler", "flow_grpo", "--eta", "0.7"], "grpo_is with Flow-GRPO's step, a = 0.7"),
    "window_2": ([*GRPO, "--sde-window", "2"], "grpo_is with 2 noisy steps a round, placed at random"),
    "no_cfg": ([*GRPO, "--no-train-guidance"], "grpo_is sampling and training without guidance (1 call a step)"),
    "ema_0.9": ([*GRPO, "--ema-decay", "0.9"], "grpo_is evaluated with an EMA of the LoRA, decay 0.9"),
}


@dataclass
class Args:
    output_dir: str = "runs/prompt_following"
    """where the runs go: {output_dir}/{setting}/seed_{seed}"""
    jobs: int = 2
    """runs at a time (each on one thread)"""
    seeds: int = 3
    """seeds first_seed, first_seed + 1, ... of each setting"""
    first_seed: int = 0
    """the first seed (two calls with their own seeds share the cores without sharing a run)"""
    epochs: int = 16
    """epochs a run (64 reward queries each)"""
    settings: tuple[str, ...] = tuple(SETTINGS)
    """which settings to run"""
    summarize: bool = False
    """instead of running: read the finished runs, write docs/results/prompt_following.{json,md,png}"""
    docs_dir: str = "docs"
    """where --summarize writes: the section at the end of {docs_dir}/RESULTS.md, its files in {docs_dir}/results/"""


def folder(args: Args, name: str, seed: int) -> str:
    return os.path.join(args.output_dir, name, f"seed_{seed}")


def run_all(args: Args) -> None:
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        fail(f"unknown setting(s) {', '.join(sorted(unknown))}; choose from {', '.join(SETTINGS)}")

    def one(job):
        name, seed = job
        out = folder(args, name, seed)
        if metrics(out) and metrics(out)[-1]["epoch"] == args.epochs:
            return None  # finished before
        script, *flags = SETTINGS[name][0]
        command = [sys.executable, script, *TASK, *flags, "--num-epochs", str(args.epochs), "--sample-every", "4",
                   "--seed", str(seed), "--output-dir", out, "--exp-name", name]  # fmt: skip
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log.txt"), "w") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return None if done.returncode == 0 else f"{name} seed {seed}"

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(name, seed) for seed in seeds for name in args.settings]  # every setting's first seed first
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess: the threads only wait for them
        failed = [f for f in pool.map(one, jobs) if f]
    if failed:
        fail(f"{len(failed)} run(s) failed: {', '.join(failed)} (each one's log.txt says why)")


def metrics(out: str) -> list[dict]:
    """The metrics lines of the run in `out` (its one run folder), or [] while there is none."""
    runs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))] if os.path.isdir(out) else []
    if len(runs) != 1 or not os.path.exists(os.path.join(out, runs[0], "metrics.jsonl")):
        return []
    with open(os.path.join(out, runs[0], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(lines: list[dict]) -> list[dict]:
    """The run's evaluations (the start and every 4th epoch): queries, held-out all-three share, held-out reward,
    the training's seconds so far (one thread, evaluations excluded), the training reward of the epochs since the
    last evaluation (seen prompts, eta-1 samples) and the KL from the pretrained sampler."""
    first = lines[0]
    out = [
        {
            "epoch": 0,
            "queries": 0,
            "held_out": first["eval_fidelity"],
            "held_out_reward": first["eval_reward_mean"],
            "seconds": 0.0,
            "train_reward": None,
            "kl": 0.0,
        }
    ]  # the start's evaluation, which epoch 1's line carries
    seconds, since = 0.0, []
    for line in lines:
        seconds += 64 / line["images_per_sec"]
        since.append(line["reward_mean"])
        if line["epoch"] % 4 == 0:
            out.append({"epoch": line["epoch"], "queries": 64 * line["epoch"], "held_out": line["eval_fidelity"],
                        "held_out_reward": line["eval_reward_mean"], "seconds": seconds,
                        "train_reward": statistics.mean(since), "kl": line["eval_kl"]})  # fmt: skip
            since = []
    return out


def mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(args: Args) -> None:
    found = {}
    for name in SETTINGS:
        for seed in range(args.seeds):
            lines = metrics(folder(args, name, seed))
            if lines and lines[-1]["epoch"] == args.epochs:
                found.setdefault(name, []).append(curve(lines))
    if not found:
        fail(f"no finished run under {args.output_dir}: run this script without --summarize first")
    rows = {}
    for name, runs in found.items():
        end = [run[-1] for run in runs]
        last_two = [statistics.mean(p["held_out"] for p in run[-2:]) for run in runs]  # the last two evaluations
        rows[name] = {
            "seeds": len(runs),
            "held_out_start": statistics.mean(run[0]["held_out"] for run in runs),
            "held_out_end": [p["held_out"] for p in end],
            "held_out_last_two": last_two,
            "gain_per_100_queries": [
                100 * (v - run[0]["held_out"]) / end[0]["queries"] for v, run in zip(last_two, runs)
            ],
            "gain_per_minute": [
                (v - run[0]["held_out"]) / (p["seconds"] / 60) for v, run, p in zip(last_two, runs, end)
            ],
            "train_reward_first": [run[1]["train_reward"] for run in runs],
            "train_reward_last": [p["train_reward"] for p in end],
            "kl_end": [p["kl"] for p in end],
            "train_minutes": [p["seconds"] / 60 for p in end],
            "curves": runs,
        }
    out = os.path.join(args.docs_dir, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prompt_following.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [
        "| setting | seeds | held-out all three right: start -> end (mean of the last two evaluations) | change"
        " per 100 queries | change per training minute | training reward (seen prompts): epochs 1-4 -> 13-16 | KL at"
        " the end | training minutes (1 thread) | what it is |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| `{name}` | {row['seeds']} | {row['held_out_start']:.2f} -> {mean_sd(row['held_out_last_two'])} |"
            f" {mean_sd(row['gain_per_100_queries'], 3)} | {mean_sd(row['gain_per_minute'], 3)} |"
            f" {mean_sd(row['train_reward_first'])} ->"
            f" {mean_sd(row['train_reward_last'])} | {mean_sd(row['kl_end'], 1)} |"
            f" {mean_sd(row['train_minutes'], 1)} | {SETTINGS[name][1]} |"
        )
    seeds = sorted({row["seeds"] for row in rows.values()})
    intro = (
        "Written by `python benchmarks/results/prompt_following.py --summarize` from the runs of `prompt_following.py`:"
        " `assets/tiny-sd3` (an SD 3 pipeline at 32 px, which draws its prompts' colours but hardly their shapes),"
        " rewarded by `prompt_following` (the share of the prompt's shape, colour and background the image shows, read"
        " back from the pixels), trained on `shapes_seen` and evaluated on `shapes_unseen`, whose colour-shape pairs"
        " never occur in training (30 prompts, 2 images each at eta 0 from fixed noise, guidance 5, at the start and"
        f" every 4 epochs). {args.epochs} epochs of 64 images (8 prompts x 8), 6 steps, guidance 5;"
        f" {'/'.join(map(str, seeds))} seed(s) a setting, mean ± standard deviation over them. The measure: the share"
        " of held-out images that follow all three parts of their prompt (`eval_fidelity`), its change per 100 reward"
        " queries and against the training's minutes on one CPU thread (evaluations excluded; the runs shared a"
        " two-core machine, two at a time, with other work, so minutes compare settings only roughly)."
    )
    section = "\n".join([compare.PROMPT_FOLLOWING, "", intro, "", *lines, "",
                         "![held-out prompt following against reward queries and minutes, and the training reward]"
                         "(results/prompt_following.png)", "", ""])  # fmt: skip
    path = os.path.join(args.docs_dir, "RESULTS.md")
    text = open(path).read() if os.path.isfile(path) else "# Results\n"
    section += "\n".join(compare.hand_written("prompt_following", text)) + "\n"
    with open(os.path.join(out, "prompt_following.md"), "w") as f:
        f.write(section)
    with open(path, "w") as f:
        f.write(compare.with_last_section(text, section))
    print("\n".join(lines))
    plot(rows, os.path.join(out, "prompt_following.png"))
    print(f"wrote {out}/prompt_following.md and put it at the end of {path}")


def plot(rows: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -r benchmarks/results/requirements-plots.txt): no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, row) in enumerate(rows.items()):
        colour = plt.cm.tab10(i % 10)
        for j, run in enumerate(row["curves"]):
            label = name if j == 0 else None
            axes[0].plot([p["queries"] for p in run], [p["held_out"] for p in run], color=colour, label=label, lw=1)
            axes[1].plot([p["seconds"] / 60 for p in run], [p["held_out"] for p in run], color=colour, lw=1)
            axes[2].plot([p["queries"] for p in run[1:]], [p["train_reward"] for p in run[1:]], color=colour, lw=1)
    axes[0].set(xlabel="reward queries", ylabel="held-out images with shape, colour and background right")
    axes[1].set(xlabel="training minutes (one CPU thread)", ylabel="held-out, all three right")
    axes[2].set(xlabel="reward queries", ylabel="training reward (seen prompts), mean of 4 epochs")
    axes[0].legend(fontsize=7)
    figure.suptitle("assets/tiny-sd3, prompt following: unseen colour-shape pairs, one line per seed")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if min(args.jobs, args.seeds) < 1 or args.first_seed < 0 or args.epochs < 4 or args.epochs % 4:
        fail(
            "--jobs and --seeds must be at least 1, --first-seed at least 0, --epochs a multiple of 4 (the evaluations)"
        )
    if args.summarize:
        summarize(args)
    else:
        run_all(args)
