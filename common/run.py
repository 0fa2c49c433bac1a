"""The run's lifecycle, the same in all six scripts, so that each script shows its method and not its plumbing: Run
reads the flags of RunArgs (common/flags.py) and does the processes and seeding, the run folder and resuming,
tracking, the held-out evaluation and its sample grids, the metrics log, checkpoints and the final LoRA
(docs/RUNS.md says what a run folder holds). A script calls it in a few visible lines:

    run = Run(args, "DDPO", name=args.reward, counter="epoch", end=args.num_epochs)   # processes, device, seeds
    ...                                                                # the model, reward, LoRA and optimizer
    start = run.start(model, optimizer, reward_fn, eval_prompts)       # the run folder; --resume's checkpoint
    for epoch in run.steps(start):                                     # the first evaluation, a progress bar
        ...                                                            # the method, its optimizer step:
        run.check_gradients(loss)                                      # torchrun's mean; a NaN ends the run
        ...                                                            # clip, optimizer.step(), zero_grad()
        run.log(epoch, metrics)                                        # metrics, grids, checkpoints (rank 0)
    run.finish()                                                       # the final LoRA, the model card
"""

import atexit
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from common import hooks
from common.checkpoint import find_checkpoint, open_run_dir, run_dir_of, save_checkpoint, why
from common.cli import Running, fail
from common.distributed import average_gradients, cleanup, setup
from common.flags import RunArgs
from common.hub import check_hub, model_card, push, relative_command
from common.prompts import PROMPT_SETS
from common.rewards import Reward
from common.sampling import sample
from common.shapes import accuracy, describe


class Stateful(Protocol):
    """Method state that a checkpoint keeps and a resumed run restores (DDPO's per-prompt reward buffers)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (oneDNN's own check). Where it does not, torch emulates
    them: on a 2-core AVX2 machine, a 1024^2 bf16 matrix product ran at 0.6 GFLOP/s against fp32's 48."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent in some builds
    return True if check is None else bool(check())


class Run:
    def __init__(self, args: RunArgs, method: str, name: str, counter: str, end: int):
        """Joins the torchrun processes (if any), picks the device and the frozen weights' dtype, seeds every
        generator and reads --resume's checkpoint (cli has checked it). `method` names the method in the model card;
        `name` leads the run folder's name (the reward); the run counts `counter`s, "step" (optimizer steps) or
        "epoch" (sampling rounds), up to `end`."""
        self.args, self.method, self.counter, self.end = args, method, counter, end
        self.rank, self.world_size, self.device = setup(args.cuda)  # one process per device under torchrun
        if self.device.type == "cpu" and args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
        precision = args.mixed_precision if args.mixed_precision != "auto" else "bf16" * (self.device.type == "cuda")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # of the frozen weights
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and self.rank == 0 and not cpu_has_bf16():
            print(
                "note: this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX), so --mixed-precision bf16 runs"
                " many times slower here than --mixed-precision no"
            )
        self.resume_dir, self.state = find_checkpoint(args.resume) if args.resume is not None else (None, None)
        self.dir = run_dir_of(self.resume_dir) if self.resume_dir else None  # a new run's folder is made by start
        if self.state and self.state[counter] >= end:
            flag, done = f"--{'train-steps' if counter == 'step' else 'num-epochs'}", self.state[counter]
            if done > end:
                fail(
                    f"{flag} is {end} but {self.resume_dir} is at {counter} {done}: a run cannot go back; pass a"
                    f" larger {flag} to extend it"
                )
            if self.rank == 0:
                print(f"{self.dir} is already finished at {counter} {done}: pass a larger {flag} to extend it")
            raise SystemExit(0)
        # a path, a server's URL, or a weighted sum of them: each term's file name, or the server's address and path
        terms = [re.sub("https?://", "", t).strip("/") if "://" in t else os.path.basename(t) for t in name.split("+")]
        name = "+".join(terms)
        name = re.sub(r"[^\w.+-]+", "_", name)[:60]
        self.name = f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        # prompts and per-sample seeds, on the CPU: the same draws on every device and rank (each rank keeps its slice)
        self.rng = torch.Generator().manual_seed(args.seed)
        self.writer, self.logged, self.eval_reward, self.first_eval_reward = None, False, None, None
        self.eval_extra = {}  # what the last evaluation adds to the metrics lines: eval_kl, a sum's parts
        self.first_eval_extra = {}  # and what the first one added
        self.hub_user = check_hub(args.hub_model_id) if args.push_to_hub and self.rank == 0 else None
        self.commands = list((self.state or {}).get("commands", []))  # the command that started it, then resumes

    def start(
        self,
        model,
        optimizer: torch.optim.Optimizer,
        reward_fn,
        eval_prompts: list[str],
        eval_eta: float = 0.0,
        reward_name: str | None = None,
        card_notes: str = "",
        method_state: dict[str, Stateful] | None = None,
        ema=None,
    ) -> int:
        """Opens the run folder (rank 0 writes it for all ranks and locks it while the run lasts: a new folder, or the
        resumed run's), tracking and TensorBoard, and loads the resumed checkpoint's LoRA, optimizer, random state,
        counter and `method_state` (objects with state_dict and load_state_dict, saved in every checkpoint under
        their names). The optimizer keeps its own learning rate and weight decay, those of this command. Evaluations
        sample `eval_prompts` twice each from fixed x_T (DDIM at `eval_eta`, with fixed noise) and score them with
        `reward_fn`, named in the console and the model card `reward_name` (default: the run's name), the card adding
        `card_notes`; with an `ema` (common.lora.EMA), with its averaged LoRA, which every checkpoint keeps and the
        run's end saves in ema/ beside the LoRA. Returns the counter to continue from (0 for a new run)."""
        args = self.args
        self.model, self.optimizer, self.reward_fn, self.eval_prompts = model, optimizer, reward_fn, eval_prompts
        self.reward_name, self.card_notes = reward_name or self.name.split("__")[0], card_notes
        self.method_state, self.ema = {**(method_state or {}), **({"ema": ema} if ema else {})}, ema
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.state:  # the LoRA is read before the run folder is touched: a refused resume changes nothing there
            model.load_lora(self.resume_dir)
        self.dir = open_run_dir(args.output_dir, self.name, self.resume_dir, self.state, self.rank)
        self.name = os.path.basename(self.dir)  # suffixed if another run took the name first
        self.commands.append(relative_command(sys.argv, self.dir))
        Running.folder = self.dir  # where Ctrl-C says the last checkpoint is
        if self.rank == 0 and not self.resume_dir:  # a new run that ends before its first metrics leaves no folder
            error_log = os.path.join(self.dir, "error.log")  # a failed reward's traceback, which the sentence names
            atexit.register(lambda: self.logged or os.path.exists(error_log) or shutil.rmtree(self.dir, True))
        if self.rank == 0:
            if args.track:
                try:
                    import wandb
                except ImportError:
                    fail("--track logs to Weights and Biases, which is not installed: pip install wandb")
                wandb.init(
                    project=args.wandb_project_name,
                    entity=args.wandb_entity,
                    config=vars(args),
                    name=self.name,
                    id=self.name,
                    resume="allow",
                    sync_tensorboard=True,
                    save_code=True,
                )
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.dir)
            table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.eval_cond = model.encode(eval_prompts * 2)
        self.eval_latents = model.initial_latents(len(eval_prompts) * 2, torch.Generator().manual_seed(args.seed))
        self.eval_eta = eval_eta
        if not self.state:
            return 0
        this_command = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(self.state["optimizer"])
            self.rng.set_state(self.state["rng"])
            for key, obj in self.method_state.items():
                obj.load_state_dict(self.state[key])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a state.pt written by other code, or tampered
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            fail(f"the checkpoint {self.resume_dir} does not fit this run ({reason}); resume from another one")
        for group, values in zip(optimizer.param_groups, this_command):  # which may differ from the checkpoint's
            group.update(values)
        self.eval_reward = self.state.get("eval_reward")
        self.first_eval_reward = self.state.get("first_eval_reward")
        self.eval_extra = self.state.get("eval_extra", {})
        self.first_eval_extra = self.state.get("first_eval_extra", {})
        return self.state[self.counter]

    @torch.no_grad()
    def evaluate(self, count: int) -> float:
        """Fixed-seed samples on the held-out prompts: a grid (samples/ and TensorBoard), and their mean reward; and
        what the reward does not see: eval_kl, the KL of the fine-tuned sampler from the pretrained one along these
        paths (common.sampling.sample), and, when the prompts are the tiny models' world (assets/tiny-sd, tiny-sd3),
        eval_fidelity, the share of samples that still show what their prompt asks (common.shapes.describe). With an
        EMA, the samples are the averaged LoRA's."""
        generator = torch.Generator().manual_seed(self.args.seed) if self.eval_eta > 0 else None
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            x0, record = sample(
                self.model,
                self.eval_latents,
                self.eval_cond,
                self.args.num_steps,
                self.args.guidance_scale,
                self.eval_eta,
                generator,
                kl=True,
            )
        images = self.model.decode(x0)
        if count == 0 and not (images.isfinite().all() and images.std() > 1e-4):  # the pretrained model, once
            what = "not finite" if not images.isfinite().all() else "one flat colour"
            fail(
                f"the pretrained model's first samples are {what}: its weights or scheduler config look broken"
                f" (check --pretrained-model {self.args.pretrained_model}); nothing was trained"
            )
        path = os.path.join(self.dir, "samples", f"{self.counter}_{count:06d}.png")
        grid = self.written("the sample grid", path, lambda: save_grid(images, path, len(self.eval_prompts)))
        self.written(
            "TensorBoard's events", self.dir, lambda: self.writer.add_image("samples", grid, count, dataformats="HWC")
        )
        reward = self.reward_fn(images, self.eval_prompts * 2).mean().item()
        # logged with the next metrics line: the divergence from the pretrained model along these paths, and for a
        # weighted sum of rewards each part's held-out mean
        parts = self.reward_fn.last if isinstance(self.reward_fn, Reward) else {}
        self.eval_extra = {
            "eval_kl": record.kl.mean().item(),
            **{f"eval_{n}_mean": v.mean().item() for n, v in parts.items()},
        }
        if set(self.eval_prompts) <= set(PROMPT_SETS["shapes"]):
            self.eval_extra["eval_fidelity"] = accuracy(describe(images), self.eval_prompts * 2)["all"]
        return reward

    def written(self, what: str, path: str, write):
        """write(), or one sentence naming what could not be written where and why (disk full, file too large,
        permission), and which checkpoint is intact."""
        try:
            result = write()
            if self.writer is not None and what == "TensorBoard's events":
                self.writer.flush()  # its writes happen in a thread: a failure surfaces here
            return result
        except Exception as e:  # an OSError, or a library's own error around one (torch, safetensors, PIL)
            fail(f"could not write {what} {path} ({why(e, path)}); {self.last_checkpoint()}")

    def last_checkpoint(self) -> str:
        folder = os.path.join(self.dir or "", "checkpoints")
        names = sorted(n for n in os.listdir(folder) if ".tmp" not in n) if os.path.isdir(folder) else []
        if not names:
            return "no checkpoint has been written yet"
        return f"the last checkpoint, {os.path.join(folder, names[-1])}, is intact (resume with --resume {self.dir})"

    def steps(self, start: int):
        """start + 1, ..., the end, with a progress bar on rank 0; a new run is evaluated before its first step."""
        if start == 0 and self.rank == 0:  # it also checks the pretrained model: a broken one leaves no run folder
            self.eval_reward = self.first_eval_reward = self.evaluate(0)
            self.first_eval_extra = dict(self.eval_extra)
        self.bar = tqdm(range(start + 1, self.end + 1), initial=start, total=self.end, disable=self.rank != 0)
        counts = self.bar
        for hook in hooks.training_loop:
            counts = hook(counts)
        yield from counts

    def check_gradients(self, loss: torch.Tensor) -> None:
        """Before an optimizer step: the LoRA's gradients averaged over torchrun's processes (so that every process
        takes the same step; nothing to do in one process), and a loss or gradient that is not finite ends the run
        with one sentence, before the LoRA is overwritten."""
        average_gradients(self.params)
        norms = [torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if torch.isfinite(grad_norm) and torch.isfinite(loss):
            return
        args, first = self.args, self.optimizer.state_dict()["state"] == {}  # no update taken yet: not the LoRA
        lr, weight_decay = self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[0]["weight_decay"]
        causes = f"the model, or --guidance-scale {args.guidance_scale}"
        if not first:
            causes = f"--learning-rate {lr} (lower it), --weight-decay {weight_decay} or --guidance-scale"
            causes += f" {args.guidance_scale}"
        fail(
            f"the loss ({loss.item()}) or the gradient's norm ({grad_norm.item()}) is not finite"
            f"{' before the first update' if first else ''}: the likely cause is {causes}; stopped before the LoRA"
            f" was overwritten, and {self.last_checkpoint()}"
        )

    def log(self, count: int, metrics: dict) -> None:
        """Rank 0: the held-out evaluation every --sample-every and at the end, one line of metrics.jsonl and the
        TensorBoard scalars, and a checkpoint every --save-every and at the end (with the method's state, start's
        `method_state`)."""
        if self.rank != 0:
            return
        end = self.end
        if count % self.args.sample_every == 0 or count == end:
            self.eval_reward = self.evaluate(count)
        metrics = {self.counter: count, **metrics, "eval_reward_mean": self.eval_reward, **self.eval_extra}
        if self.device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        # JSON has no NaN: a value that is not a number is logged as null (and TensorBoard skips it)
        metrics = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}
        path = os.path.join(self.dir, "metrics.jsonl")
        self.written("the metrics", path, lambda: append_line(path, json.dumps(metrics)))
        self.logged = True  # the folder now holds a run's record: kept whatever happens next
        shown = {k: metrics[k] for k in ("reward_mean", "loss", "eval_reward_mean") if metrics.get(k) is not None}
        self.bar.set_postfix({k.removesuffix("_mean"): f"{v:.4g}" for k, v in shown.items()}, refresh=False)

        def add_scalars():
            for name, value in metrics.items():
                if name != self.counter and value is not None:
                    group = "losses/" if "loss" in name or "kl" in name else "charts/"
                    self.writer.add_scalar(group + name, value, count)

        self.written("TensorBoard's events", self.dir, add_scalars)
        if count % self.args.save_every == 0 or count == end:
            state = {
                "script": os.path.basename(sys.argv[0]),
                "run_name": self.name,
                self.counter: count,
                "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.get_state(),
                "args": vars(self.args),
                "eval_reward": self.eval_reward,
                "first_eval_reward": self.first_eval_reward,
                "eval_extra": self.eval_extra,
                "commands": self.commands,
                "first_eval_extra": self.first_eval_extra,
            }
            checkpoint_dir = os.path.join(self.dir, "checkpoints", f"{self.counter}_{count:06d}")
            method_state = {key: obj.state_dict() for key, obj in self.method_state.items()}
            save_checkpoint(checkpoint_dir, self.model, {**state, **method_state})

    def finish(self) -> None:
        """The final LoRA in the run folder (the family's pipeline `.load_lora_weights(run_dir)` reads it), its model
        card (README.md) and, with --push-to-hub, both uploaded; the console's last lines say what is where."""
        if self.rank == 0:
            self.written("the final LoRA", self.dir, lambda: self.model.save_lora(self.dir))
            if self.ema:  # and its average, in the same format: load_lora_weights(run_dir / "ema") reads it
                with self.ema.applied():
                    ema_dir = os.path.join(self.dir, "ema")
                    self.written("the EMA's LoRA", ema_dir, lambda: self.model.save_lora(ema_dir))
            self.written("TensorBoard's events", self.dir, self.writer.close)
            grids = sorted(os.listdir(os.path.join(self.dir, "samples")))
            grid = f"samples/{grids[-1]}" if grids else None
            repo_id = None
            if self.hub_user:
                name = self.args.hub_model_id or self.name
                repo_id = name if "/" in name else f"{self.hub_user}/{name}"
            rewards = {
                f"pretrained ({self.counter} 0)": self.first_eval_reward,
                f"fine-tuned ({self.counter} {self.end})": self.eval_reward,
            }
            card = model_card(
                self.dir,
                self.args,
                self.method,
                self.model,
                self.reward_name,
                grid,
                rewards,
                self.eval_prompts[0],
                repo_id,
                self.card_notes,
                self.commands,
            )
            path = os.path.join(self.dir, "README.md")
            self.written("the model card", path, lambda: write_text(path, card))
            where = push(self.dir, repo_id, grid) if repo_id else None
            folder = os.path.join(self.dir, "checkpoints")
            lines = [
                f"held-out {self.reward_name}: {rounded(self.first_eval_reward)} at the start,"
                f" {rounded(self.eval_reward)} at the end",
                f"LoRA: {self.dir}/pytorch_lora_weights.safetensors",
                *([f"its EMA (evaluated above): {self.dir}/ema/pytorch_lora_weights.safetensors"] if self.ema else []),
                f"model card: {path}",
                f"last checkpoint: {folder}/{sorted(os.listdir(folder))[-1]}",
            ]
            if "eval_fidelity" in self.eval_extra:  # the tiny models' world: what the reward does not see
                first, last = self.first_eval_extra.get("eval_fidelity"), self.eval_extra["eval_fidelity"]
                share = f"{rounded(first)} at the start, {rounded(last)} at the end"
                lines.insert(1, f"held-out samples that follow their prompt: {share}")
            print("\n".join(lines + ([f"uploaded to {where}"] if where else [])))
        cleanup()


def rounded(value) -> str:
    """A number as the console shows it: 4 significant digits."""
    return "n/a" if value is None else f"{value:.4g}"


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def append_line(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def save_grid(images: torch.Tensor, path: str, columns: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> one PNG, `columns` images a row. Returns the grid, (H', W', 3) uint8."""
    from PIL import Image

    rows = -(-len(images) // columns)
    padded = torch.cat([images, images.new_zeros(rows * columns - len(images), *images.shape[1:])])
    grid = padded.view(rows, columns, *images.shape[1:]).permute(0, 3, 1, 4, 2).flatten(0, 1).flatten(1, 2)
    grid = (grid.float().clamp(0, 1) * 255).round().byte().cpu()
    Image.fromarray(grid.numpy()).save(path)
    return grid
