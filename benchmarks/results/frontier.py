"""Over-optimisation: each method's held-out reward against what the reward does not see, at several KL weights.

    python benchmarks/results/frontier.py --jobs 2      # the runs: 9 methods x up to 5 settings on seed 0, then
                                                        # 2 settings each on seeds 1 and 2, one thread a run
    python benchmarks/results/frontier.py --flow --jobs 2   # the second task: the flow model, 2 methods
    python benchmarks/results/frontier.py --summarize   # docs/results/frontier.md and its figures, which
                                                        # docs/RESULTS.md leads with (compare.py --summarize keeps it)

The task is compare.py's (the tiny model, colourfulness, 10 DDIM steps, guidance 5, 512 reward queries a run) with
one change: 18 of the 90 shapes prompts are held out of training (every fifth) instead of 4, so that each evaluation
reads 36 images (18 prompts x 2 seeds). Each method runs at the learning rate compare.py's reward-only sweep picked
(docs/results/sweep.json) with three KL weights, and at a tenth of that rate with the first two. At every
evaluation (8 a run and the start) three measures come from the same held-out images:
- reward: their mean colourfulness, read back from the sample grid;
- fidelity: the share that still show what their prompt asks (shape, its colour and the background's, all three
  right: common.shapes.describe, exact on drawn images; the pretrained tiny-sd follows 100% of these prompts);
- KL: the run's eval_kl, the summed per-dimension KL of the fine-tuned sampler's steps from the pretrained ones
  along the held-out trajectories (docs/ALGORITHMS.md, section 1.8).
The headline: the highest held-out reward each method reaches at an evaluation where fidelity is still >= 90% of
the start's (early stopping at the best such evaluation), at its best setting, mean and spread over seeds.
"""

import dataclasses
import json
import os
import shlex
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.results import compare  # noqa: E402  (the repository's root is on the path only from here)
from common.cli import fail  # noqa: E402
from common.prompts import PROMPT_SETS  # noqa: E402
from common.shapes import parse  # noqa: E402

# method: its KL weights, the first its default. The terms differ in scale (docs/ALGORITHMS.md, section 1.8): DRaFT
# sums the step KL over the steps that carry gradient and weighs it against the reward itself (colourfulness moves by
# ~100); DDPO adds it to a policy loss whose advantages are standardised (~1); RWR adds a squared distance of the
# predictions to a regression of the same scale; BRAID's default is 0.01 (SEIKO's ratio is 1)
KL_WEIGHTS = {
    "draft_full": [0.0, 1.0, 10.0],
    "draft_k1": [0.0, 1.0, 10.0],
    "draft_lv2": [0.0, 1.0, 10.0],
    "ddpo_is": [0.0, 0.1, 1.0],
    "ddpo_sf": [0.0, 0.1, 1.0],
    "rwr_softmax": [0.0, 1.0, 10.0],
    "rwr_sparse": [0.0, 1.0, 10.0],
    "braid_boot": [0.01, 0.1, 1.0],
    "braid_c0": [0.01],  # BRAID's other axis: no conservatism (--c 0), at its default KL weight
}
# and at a tenth of that learning rate with the first two weights: a smaller step, so that early stopping has a finer
# grain (at the swept rates, several methods lose the prompts before their first evaluation)
SLOWER = 0.1


def settings(name: str, flow: bool = False) -> list[tuple[float, float]]:
    """A method's (learning-rate factor, KL weight) pairs: seed 0 runs them all."""
    if flow:
        return FLOW[name][1]
    return [(1.0, w) for w in KL_WEIGHTS[name]] + [(SLOWER, w) for w in KL_WEIGHTS[name][:2]]


# the second task (--flow): the flow model, assets/tiny-sd3, whose colours follow their prompts but whose shapes are
# blobs (assets/README.md), so that its fidelity counts the two colours. Its two methods with learning tests, at
# their tests' learning rates (tests/test_tiny_sd3.py; no sweep was run on it): DDPO-SF at two KL weights, DRaFT-1
# at two rates (its one step with gradient, a flow's last, carries no noise: no KL to penalise, so the flag is refused)
FLOW = {"draft_k1": (3e-3, [(1.0, 0.0), (0.3, 0.0)]), "ddpo_sf": (5e-3, [(1.0, 0.0), (1.0, 1.0)])}
FLOW_MODEL = os.path.join(ROOT, "assets", "tiny-sd3")
FIDELITY = 0.9  # the constraint of the headline table, relative to the run's start: BRAID samples at eta 1, where the
# pretrained tiny-sd follows fewer of these prompts (about 82%) than at eta 0 (all of them)
HELD_OUT = PROMPT_SETS["shapes"][2::5]  # 18 of the 90, every shape, colour and background among them


@dataclass
class Args:
    output_dir: Optional[str] = None
    """where the runs go, {output_dir}/{method}/lr{factor}x_kl{weight}/seed{seed}/ (default runs/frontier; with
    --flow, runs/frontier_flow)"""
    methods: Optional[tuple[str, ...]] = None
    """which methods to run (default: all of KL_WEIGHTS, or with --flow of FLOW)"""
    flow_dir: str = "runs/frontier_flow"
    """--summarize: where the second task's runs are"""
    flow: bool = False
    """the second task: the flow model (assets/tiny-sd3), fidelity counting the two colours; its section goes after
    the first task's in frontier.md"""
    seeds: int = 3
    """seeds at each method's best and reward-only settings (seed 0 runs every setting)"""
    jobs: int = 1
    """runs side by side (each one thread: --jobs 2 on 2 cores halves the time)"""
    lrs: str = "docs/results/sweep.json"
    """the learning rates: compare.py's sweep.json (each method's best_lr)"""
    summarize: bool = False
    """write {docs_dir}/results/frontier.md and frontier_*.png from the runs, and put them at the head of RESULTS.md"""
    docs_dir: str = "docs"
    pretrained_model: Optional[str] = None
    """another pipeline in place of assets/tiny-sd (with --flow, assets/tiny-sd3)"""
    extra: str = ""
    """flags appended to every command line"""
    budget: int = 512
    """reward queries per run, as compare.py counts them"""


def compare_args(args: Args, write: bool = False) -> compare.Args:
    """compare.py's settings for these runs: its budget and batch, 8 evaluations, the 18 held-out prompts (their
    files written into --output-dir when `write`)."""
    folder = os.path.abspath(args.output_dir)
    held_out, train = os.path.join(folder, "held_out.txt"), os.path.join(folder, "train.txt")
    for path, prompts in ((held_out, HELD_OUT), (train, [p for p in PROMPT_SETS["shapes"] if p not in HELD_OUT])):
        if write:
            with open(path, "w") as f:
                f.write("\n".join(prompts) + "\n")
    extra = f"--prompt-file {shlex.quote(train)} --validation-prompts {shlex.quote(held_out)} {args.extra}"
    model = args.pretrained_model or (FLOW_MODEL if args.flow else None)
    return compare.Args(output_dir=folder, budget=args.budget, pretrained_model=model, extra=extra)


def run_folder(args: Args, name: str, setting: tuple[float, float], seed: int) -> str:
    factor, weight = setting
    return os.path.join(os.path.abspath(args.output_dir), name, f"lr{factor:g}x_kl{weight:g}", f"seed{seed}")


def learning_rates(args: Args) -> dict:
    if args.flow:
        return {name: lr for name, (lr, _) in FLOW.items()}
    with open(args.lrs) as f:
        return {name: entry["best_lr"] for name, entry in json.load(f)["sweep"].items()}


def run_all(args: Args) -> None:
    """Seed 0 at every setting; then the other seeds at two settings of each method: its best on seed 0 (the highest
    held-out reward at fidelity >= 90% of the start's) and the reward-only one (the swept rate, the default weight)."""
    lrs, failed, lock = learning_rates(args), [], threading.Lock()
    os.makedirs(args.output_dir, exist_ok=True)
    flags = compare_args(args, write=True)

    def one(job):
        name, (factor, weight), seed = job
        try:
            compare.run_one(flags, name, lrs[name] * factor, seed, run_folder(args, name, (factor, weight), seed),
                            ["--kl-weight", f"{weight:g}"])  # fmt: skip
        except RuntimeError as e:
            print(e)
            with lock:
                failed.append(f"{name} lr x{factor:g} kl {weight:g} seed {seed}")

    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess: the threads only wait for them
        list(pool.map(one, [(name, setting, 0) for name in args.methods for setting in settings(name, args.flow)]))
        found = collect(args, seeds=1)
        more = [(name, setting, seed) for seed in range(1, args.seeds) for name in args.methods if name in found
                for setting in dict.fromkeys([chosen(found[name]), settings(name, args.flow)[0]])]  # fmt: skip
        list(pool.map(one, more))
    if failed:
        fail(f"{len(failed)} of the runs failed: {', '.join(failed)} (each one's log.txt says why)")


def read_grid(path: str, columns: int) -> torch.Tensor:
    """The images of a sample grid, (N, 3, H, W) in [0, 1], in the order they were drawn (row by row)."""
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    size = grid.shape[2] // columns
    return grid.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)


def points(folder: str, counter: str, per_unit: int, prompts: list[str], colours_only: bool = False) -> list[dict]:
    """One run's evaluations: reward queries, held-out reward, fidelity and KL at each. Fidelity: the share of images
    whose shape, colour and background all match their prompt (`colours_only`: the two colours)."""
    from common.rewards import make_reward
    from common.shapes import accuracy, describe

    def fidelity(images):
        if not colours_only:
            return accuracy(describe(images), prompts * 2)["all"]
        asked = [parse(p) for p in prompts * 2]
        seen = describe(images)
        right = [d["colour"] == a["colour"] and d["background"] == a["background"] for d, a in zip(seen, asked)]
        return sum(right) / len(right)

    reward_fn = make_reward("colorfulness")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        lines = {line[counter]: line for line in (json.loads(text) for text in f if text.strip())}
    out = []
    for grid in sorted(os.listdir(os.path.join(folder, "samples"))):
        unit = int(grid.split("_")[1].split(".")[0])
        images = read_grid(os.path.join(folder, "samples", grid), len(prompts))
        kl = 0.0 if unit == 0 else lines[unit]["eval_kl"]  # the start: the LoRA is zero, the sampler the pretrained one
        out.append({"queries": unit * per_unit, "reward": reward_fn(images).mean().item(), "kl": kl,
                    "fidelity": fidelity(images)})  # fmt: skip
    return out


def collect(args: Args, seeds: Optional[int] = None) -> dict:
    """{method: {(learning-rate factor, KL weight): [one list of points per finished seed]}}."""
    flags, found = compare_args(args), {}
    for name in FLOW if args.flow else KL_WEIGHTS:
        counter, (_, units, per_unit) = compare.RUNS[name][3], compare.sizes(name, flags)
        for setting in settings(name, args.flow):
            for seed in range(seeds or args.seeds):
                run, lines = compare.read_run(run_folder(args, name, setting, seed))
                if lines and lines[-1][counter] == units:
                    read = points(run, counter, per_unit, HELD_OUT, colours_only=args.flow)
                    found.setdefault(name, {}).setdefault(setting, []).append(read)
    return found


def chosen(runs: dict) -> tuple[float, float]:
    """A method's best setting: the highest fidelity-constrained reward on its first seed (as compare.py picks a
    learning rate on seed 0)."""
    return max(runs, key=lambda setting: constrained(runs[setting][0])["reward"])


def constrained(run: list[dict], threshold: float = FIDELITY) -> dict:
    """The evaluation with the highest held-out reward among those whose fidelity is at least `threshold` times the
    start's (the pretrained sampler's own; the start always qualifies): where early stopping under the constraint
    would leave the run."""
    allowed = [p for p in run if p["fidelity"] >= threshold * run[0]["fidelity"] - 1e-9]
    return max(allowed, key=lambda p: p["reward"])


def spread(values: list[float], form: str = ".1f") -> str:
    """The mean and, over more than one seed, the standard deviation."""
    if len(values) == 1:
        return f"{values[0]:{form}}"
    return f"{statistics.mean(values):{form}} ± {statistics.stdev(values):{form.lstrip('+')}}"


def plot(found: dict, lrs: dict, out: str, name: str, what: str = "all three right") -> list[str]:
    """frontier_fidelity.png and frontier_kl.png: every evaluation of every run, one panel per method, one colour per
    setting (learning rate, KL weight), seeds as separate lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r benchmarks/results/requirements-plots.txt): no figures")
        return []
    written = []
    for key, label, log in [("fidelity", f"held-out fidelity ({what})", False),
                            ("kl", "eval_kl (summed over the 10 steps)", True)]:  # fmt: skip
        columns = min(4, len(found))
        rows = -(-len(found) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False, sharey=True)
        for ax, (method, runs) in zip(axes.flat, found.items()):
            for colour, ((factor, weight), seeds) in zip(("C0", "C1", "C3", "C2"), runs.items()):
                for i, run in enumerate(seeds):
                    x = [max(p[key], 1e-2) if log else p[key] for p in run]
                    legend = f"lr {lrs[method] * factor:.2g}, kl-weight {weight:g}" if i == 0 else None
                    ax.plot(x, [p["reward"] for p in run], ".-", color=colour, alpha=0.7, lw=1, label=legend)
            if key == "fidelity":
                starts = [run[0]["fidelity"] for seeds in runs.values() for run in seeds]
                ax.axvline(FIDELITY * statistics.mean(starts), color="grey", ls="--")
                ax.invert_xaxis()  # left to right: the run moving away from the prompts
            else:
                ax.set_xscale("log")
            ax.set_title(method)
            ax.set_xlabel(label, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel("held-out colourfulness")
        for ax in axes.flat[len(found) :]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out, f"{name}_{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def measures(name: str, seed_runs: list[list[dict]], budget: int) -> dict:
    """Per seed: the fidelity-constrained best evaluation's reward, KL, queries, rise over the start and that rise per
    100 queries ("gain"); and the same for the run's end without the constraint."""
    out = {}
    for key, pick in (("best", constrained), ("end", lambda run: run[-1])):
        chosen = [pick(run) for run in seed_runs]
        if name.startswith("braid"):  # all its labels are bought before its first step
            spent = [budget] * len(chosen)
        else:
            spent = [p["queries"] for p in chosen]
        gain = [100 * (p["reward"] - run[0]["reward"]) / q if q else 0.0 for p, run, q in zip(chosen, seed_runs, spent)]
        rise = [p["reward"] - run[0]["reward"] for p, run in zip(chosen, seed_runs)]
        out[key] = {k: [p[k] for p in chosen] for k in ("reward", "kl", "queries", "fidelity")}
        out[key] |= {"gain": gain, "rise": rise}
    return out


def versus(a: str, b: str, x: list[float], y: list[float]) -> str:
    """Whether a's mean exceeds b's, and whether the difference exceeds the seeds' spread (the sum of the two
    standard deviations)."""
    mx, my = statistics.mean(x), statistics.mean(y)
    sd = sum(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (x, y))
    beyond = "beyond" if abs(mx - my) > sd else "within"
    return f"{a} {mx:+.1f} against {b} {my:+.1f}, {beyond} the seeds' spread ({sd:.1f})"


def claims(best: dict) -> list[str]:
    """The papers' claims on three footings: at equal fidelity per 100 queries and by the reward reached, and on the
    reward alone per 100 queries (the footing of the comparison below). `best`: method -> (its best setting's
    measures, its reward-only setting's)."""
    out = ["", "The papers' claims, from the same runs, on three footings: at equal fidelity (each method at its best"
           " setting, stopped at its best evaluation with fidelity >= 90% of the start's) per 100 reward queries and"
           " by the rise of held-out reward it reached; and on the reward alone (the swept learning rate, the default"
           " KL weight, the run's end whatever its fidelity) per 100 queries, the footing of the comparison below."
           " The spread is the sum of the two methods' standard deviations over seeds:", ""]  # fmt: skip
    tests = [
        ("(a) DRaFT-1 gains more than full backpropagation", "draft_k1", ["draft_full"], 1.0),
        ("(b) DRaFT-LV gains more than DRaFT-1 (the same queries a step)", "draft_lv2", ["draft_k1"], 1.0),
        ("(c) every DRaFT variant gains more than twice the best of DDPO and RWR", None, None, 2.0),
        ("DDPO-IS gains more than DDPO-SF (the DDPO paper)", "ddpo_is", ["ddpo_sf"], 1.0),
        ("DDPO-IS gains more than RWR", "ddpo_is", ["rwr_softmax", "rwr_sparse"], 1.0),
    ]
    drafts = [n for n in ("draft_full", "draft_k1", "draft_lv2") if n in best]
    others = [n for n in ("ddpo_is", "ddpo_sf", "rwr_softmax", "rwr_sparse") if n in best]
    for label, a, bs, factor in tests:
        cells = []
        for footing, index, key, value in (("at equal fidelity, per 100 queries", 0, "best", "gain"),
                                           ("at equal fidelity, reward reached", 0, "best", "rise"),
                                           ("on the reward alone, per 100 queries", 1, "end", "gain")):  # fmt: skip
            gains = {n: best[n][index][key][value] for n in best if best[n][index] is not None}
            if a is None:  # claim (c)
                if not drafts or not others or not set(drafts + others) <= set(gains):
                    cells.append(f"{footing}: {compare.verdict(None)}")
                    continue
                weakest = min(drafts, key=lambda n: statistics.mean(gains[n]))
                strongest = max(others, key=lambda n: statistics.mean(gains[n]))
                ok = statistics.mean(gains[weakest]) > factor * max(statistics.mean(gains[strongest]), 0)
                cells.append(f"{footing}: {compare.verdict(ok)} (weakest DRaFT {weakest}"
                             f" {statistics.mean(gains[weakest]):+.1f}, strongest other {strongest}"
                             f" {statistics.mean(gains[strongest]):+.1f})")  # fmt: skip
                continue
            rivals = [b for b in bs if b in gains]
            if a not in gains or not rivals:
                cells.append(f"{footing}: {compare.verdict(None)}")
                continue
            rival = max(rivals, key=lambda n: statistics.mean(gains[n]))
            ok = statistics.mean(gains[a]) > statistics.mean(gains[rival])
            cells.append(f"{footing}: {compare.verdict(ok)} ({versus(a, rival, gains[a], gains[rival])})")
        out.append(f"- {label}: " + "; ".join(cells) + ".")
    return out


def setting_rows(table: dict, lrs: dict) -> list[str]:
    """The table of every (method, setting): the constrained best and the run's end."""
    lines = [f"| method | lr | kl-weight | seeds | best reward at >= {FIDELITY:.0%} of the start's fidelity | its KL |"
             " queries to it |"
             " gain per 100 queries | end: reward | end: fidelity | end: KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in table.items():
        for (factor, weight), m in rows.items():
            top, end = m["best"], m["end"]
            lines.append(
                f"| {name} | {lrs[name] * factor:.2g} | {weight:g} | {len(top['reward'])} | {spread(top['reward'])} |"
                f" {spread(top['kl'], '.2g')} | {spread(top['queries'], '.0f')} | {spread(top['gain'], '+.1f')} |"
                f" {spread(end['reward'])} | {spread(end['fidelity'], '.2f')} | {spread(end['kl'], '.3g')} |"
            )
    return lines


def flow_md(found: dict, args: Args) -> list[str]:
    """The second task's part of the section: the flow model."""
    lrs = learning_rates(args)
    table = {name: {st: measures(name, seed_runs, args.budget) for st, seed_runs in runs.items()}
             for name, runs in found.items()}  # fmt: skip
    start = [run[0] for runs in found.values() for s in runs.values() for run in s]
    seeds = sorted({len(s) for runs in found.values() for s in runs.values()})
    return ["", "### The flow model as a second task", "",
            "`python benchmarks/results/frontier.py --flow --jobs 2`: the shipped flow-matching model"
            " (`assets/tiny-sd3`, an SD 3 pipeline) on the same prompts, split, budget and measures, except that"
            " fidelity counts the shape's colour and the background's only: its shapes are blobs (all three right on"
            " about 40% of its samples, assets/README.md). DRaFT-1 and DDPO-SF, the two methods with learning tests on"
            " it, at those tests' learning rates (no sweep was run on this model): DDPO-SF at KL weights 0 and 1,"
            " DRaFT-1 at two rates without one (its one step with gradient, a flow's last, carries no noise, so"
            f" there is no KL to penalise and the scripts refuse the flag); {'-'.join(map(str, seeds))} seed(s). At"
            f" the start: colour fidelity {min(p['fidelity'] for p in start):.2f}, held-out colourfulness"
            f" {statistics.mean(p['reward'] for p in start):.1f}.", "",
            "![frontier_flow_fidelity.png](results/frontier_flow_fidelity.png)", "",
            "![frontier_flow_kl.png](results/frontier_flow_kl.png)", "",
            *setting_rows(table, lrs)]  # fmt: skip


def observations(table: dict, best: dict) -> list[str]:
    """What the table says about the swept rates and the KL weights, from seed 0's runs."""
    first = lambda m: m["best"]["queries"][0] == 0  # noqa: E731  seed 0's constrained best: its start
    lost = [n for n, rows in table.items() if all(first(m) for (f, _), m in rows.items() if f == 1.0)]
    out = [
        f"- At the learning rate the reward-only sweep picked, {len(lost)} of {len(table)} methods"
        f" ({', '.join(lost) or 'none'}) had lost the prompts (fidelity < {FIDELITY:.0%} of the start's) by their first"
        " evaluation at every KL weight tried (seed 0): the best they reach under the constraint is the pretrained"
        " model's."
    ]
    helped = []
    for name, rows in table.items():
        by_factor = {}
        for (factor, weight), m in rows.items():
            by_factor.setdefault(factor, {})[weight] = m["best"]["reward"][0]
        for factor, weights in by_factor.items():
            default = next(iter(weights.values()))  # the first weight is the default
            top = max(weights, key=weights.get)
            if weights[top] > default + 1.0:
                helped.append(f"{name} at {factor:g}x ({default:.1f} -> {weights[top]:.1f} with {top:g})")
    out.append(f"- A KL weight above the default raised the constrained best by more than 1 (seed 0) for:"
               f" {', '.join(helped) or 'none'}.")  # fmt: skip
    slower = [n for n in table if best[n][0] != 1.0]
    out.append(f"- The best setting is the smaller learning rate for {', '.join(slower) or 'none'}.")
    return out


def frontier_md(found: dict, lrs: dict, args: Args) -> str:
    braid_fidelity = "-".join(sorted({f"{run[0]['fidelity']:.2f}" for n, runs in found.items() if n.startswith("braid")
                                      for s in runs.values() for run in s})) or "not measured"  # fmt: skip
    start_reward, braid_start = ([run[0]["reward"] for n, runs in found.items() if n.startswith("braid") == braid
                                  for s in runs.values() for run in s] for braid in (False, True))  # fmt: skip
    table = {name: {st: measures(name, seed_runs, args.budget) for st, seed_runs in runs.items()}
             for name, runs in found.items()}  # fmt: skip
    best = {name: chosen(runs) for name, runs in found.items()}
    ranked = sorted(table, key=lambda n: -statistics.mean(table[n][best[n]]["best"]["reward"]))
    lines = [
        "## Reward at equal prompt fidelity",
        "",
        "Written by `python benchmarks/results/frontier.py --summarize` from the runs of `frontier.py --jobs 2`: the"
        " task of the comparison below (tiny-sd, colourfulness, 512 reward queries a run) with 18 of the 90 prompts"
        " held out (36 images an evaluation, 8 evaluations a run and one at the start). Each method runs at the"
        " learning rate its reward-only sweep picked with three KL weights (`--kl-weight`; the first is the method's"
        f" default, BRAID's 0.01), and at {SLOWER:g}x that rate with the first two; all on seed 0, then"
        " seeds 1 and 2 at the method's best setting and at its reward-only one (the swept rate, the default weight)."
        " The best setting is picked on seed 0, as the comparison below picks its rates, so seed 0 flatters it."
        " Fidelity is the share of held-out images that still show their prompt's shape, colour and background (read"
        " back by `common.shapes.describe`, exact on drawn images); KL is `eval_kl`, the fine-tuned sampler's summed"
        " per-dimension KL from the pretrained one along the held-out trajectories. At the start: held-out"
        f" colourfulness {statistics.mean(start_reward):.1f}"
        + (f" (BRAID, which evaluates at eta 1: {statistics.mean(braid_start):.1f})." if braid_start else "."),
        "",
        "Each method at its best setting, ranked by the highest held-out reward it reaches at an evaluation where"
        f" fidelity is still >= {FIDELITY:.0%} of the start's (1.00 at DDIM eta 0; BRAID samples at eta 1, where the"
        f" pretrained model's is {braid_fidelity}; where early stopping under that constraint leaves it), mean ±"
        " standard deviation over seeds. Gain per 100 queries: that reward's gain over the start per 100 reward"
        " queries spent to reach it (BRAID: its offline labels, all bought before training).",
        "",
        f"| rank | method | lr | kl-weight | seeds | best reward at >= {FIDELITY:.0%} of the start's fidelity | gain"
        " per 100 queries |"
        " queries to it | its KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, name in enumerate(ranked, 1):
        (factor, weight), m = best[name], table[name][best[name]]["best"]
        lines.append(f"| {rank} | {name} | {lrs[name] * factor:.2g} | {weight:g} | {len(m['reward'])} |"
                     f" {spread(m['reward'])} | {spread(m['gain'], '+.1f')} | {spread(m['queries'], '.0f')} |"
                     f" {spread(m['kl'], '.2g')} |")  # fmt: skip
    lines += ["", *observations(table, best)]
    lines += ["", "Every evaluation of every run: held-out reward against fidelity (the dashed line is the"
              f" {FIDELITY:.0%}-of-the-start constraint) and against KL (log scale), one colour per setting, one line"
              " per seed.",
              "", "![frontier_fidelity.png](results/frontier_fidelity.png)", "",
              "![frontier_kl.png](results/frontier_kl.png)", "",
              "Every setting: the constrained best as above, and where the run ends without stopping.", "",
              *setting_rows(table, lrs)]  # fmt: skip
    lines += claims({n: (table[n][best[n]], table[n].get(settings(n)[0])) for n in table})
    return "\n".join(lines) + "\n"


def summarize(args: Args) -> None:
    found = collect(args)
    if not found:
        fail(f"no finished runs under {args.output_dir}: run `python benchmarks/results/frontier.py` first")
    out = os.path.join(args.docs_dir, "results")
    os.makedirs(out, exist_ok=True)
    lrs = learning_rates(args)
    plot(found, lrs, out, "frontier")
    section = frontier_md(found, lrs, args)
    flow_args = dataclasses.replace(args, flow=True, output_dir=args.flow_dir)
    flow = collect(flow_args) if os.path.isdir(args.flow_dir) else {}
    if flow:
        plot(flow, learning_rates(flow_args), out, "frontier_flow", "both colours right")
        section += "\n".join(flow_md(flow, flow_args)) + "\n"
    else:
        section += "\nThe flow model (`assets/tiny-sd3`) as a second task: not run (`frontier.py --flow`).\n"
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write(section)
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump({n: {f"lr{f:g}x_kl{w:g}": s for (f, w), s in runs.items()} for n, runs in found.items()}, f)
    path = os.path.join(args.docs_dir, "RESULTS.md")
    text = open(path).read() if os.path.isfile(path) else "# Results\n"
    with open(path, "w") as f:
        f.write(compare.lead_with(text, section))
    print(f"wrote {out}/frontier.md and put it at the head of {path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    known = FLOW if args.flow else KL_WEIGHTS
    args.methods = args.methods or tuple(known)
    args.output_dir = args.output_dir or ("runs/frontier_flow" if args.flow else "runs/frontier")
    unknown = set(args.methods) - set(known)
    if unknown:
        fail(f"unknown methods {sorted(unknown)}: choose from {', '.join(known)}")
    for name in ("jobs", "seeds", "budget"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.summarize:
        summarize(args)
    else:
        if not os.path.isfile(args.lrs) and not args.flow:
            fail(f"{args.lrs} does not exist: it is compare.py's sweep.json, which holds each method's learning rate")
        run_all(args)
        print(f"then: python benchmarks/results/frontier.py --summarize --output-dir {args.output_dir}")
