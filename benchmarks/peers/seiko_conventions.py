"""braid.py's conventions against SEIKO's, measured: both codes run on the same seeded tensors (docs/braid.md).

SEIKO: Uehara, Zhao, Black, Hajiramezanali, Scalia, Diamant, Tseng, Levine and Biancalani, 2024, "Feedback Efficient
Online Fine-Tuning of Diffusion Models", arXiv 2402.16359; code zhaoyl18/SEIKO, the BRAID authors' sibling code.

    git clone https://github.com/zhaoyl18/SEIKO /tmp/seiko         # measured at 947f9ad
    OMP_NUM_THREADS=1 python benchmarks/peers/seiko_conventions.py --seiko-dir /tmp/seiko \
        --out docs/results/seiko_conventions.json

SEIKO's code is read from --seiko-dir when this runs; none of it is copied here. Its modules import wandb, hpsv2,
torchvision, ml_collections and accelerate at the top and its scorer downloads CLIP, so they are not imported: the
script executes only the definitions and the statements that it measures (each section names them, by file and
function) in a namespace that supplies what they use. Stubbed there: ml_collections' ConfigDict (an attribute dict,
enough for SEIKO's configs); CLIP in SEIKO's scorer (the identity: the "images" given to it are unit-norm features);
in SEIKO's loss, the scorer and torchvision's resize and normalisation (the scorer returns the seeded rewards, so the
images do not matter); and torch.load in its dataset gets map_location="cpu" (its LAION weights were saved on CUDA).
Without --seiko-dir, or with a folder that lacks what is measured, the script ends with one sentence (exit 2).

Measured: (1) the weights of the reward and of the KL in each loss at the defaults, and that the path KL is the same
quantity in both; (2) the uncertainty bonus, SEIKO's over ours, on N feature vectors for several N; (3) the bootstrap
ensemble's aggregate, SEIKO's against ours and against the minimum over heads; and what SEIKO's defaults are in
braid.py's flags.
"""

import ast
import functools
import json
import math
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple, Union

import diffusers
import torch
import torch.nn.functional as F
import tyro
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from common.cli import fail  # noqa: E402
from common.families.sd import StableDiffusion  # noqa: E402
from common.models import Conditioning  # noqa: E402


@dataclass
class Args:
    seiko_dir: Optional[str] = None
    """a checkout of zhaoyl18/SEIKO"""
    out: Optional[str] = None
    """also write the numbers to this JSON file (the recorded ones: docs/results/seiko_conventions.json)"""
    seed: int = 0
    """seed of every tensor both codes are given"""
    sizes: tuple[int, ...] = (64, 256, 1024, 3072, 7168, 15360)
    """bonus: numbers N of feature vectors in the data (SEIKO's data after its 4 rounds: 1024, 3072, 7168, 15360)"""
    queries: int = 512
    """bonus and bootstrap: feature vectors at which the reward models are evaluated (not in the data)"""
    head_steps: int = 300
    """Adam steps fitting each reward head (braid.fit_head) on the first 1024 data points"""


def definitions(path: Path, names: list[str], namespace: dict) -> dict:
    """Executes the top-level functions and classes `names` of the file `path` (SEIKO's), and nothing else of it, in
    a copy of `namespace` (what they use); returns that namespace."""
    namespace = dict(namespace)
    nodes = [node for node in ast.parse(path.read_text()).body if getattr(node, "name", None) in names]
    missing = set(names) - {node.name for node in nodes}
    if missing:
        fail(f"{path} has no {', '.join(sorted(missing))}: not the version of SEIKO this script reads (947f9ad)")
    exec(compile(ast.Module(nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def statement(path: Path, prefix: str):
    """The one assignment in the file `path` whose source starts with `prefix`, compiled: a line of a training loop
    that cannot be called alone (in SEIKO's `main`, or under braid.py's `__main__`)."""
    nodes = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Assign, ast.AugAssign))]
    found = [node for node in nodes if ast.unparse(node).startswith(prefix)]
    if len(found) != 1:
        fail(f"{path} has {len(found)} statements starting '{prefix}', not 1: not the version this script reads")
    return compile(ast.Module(found, type_ignores=[]), str(path), "exec")


class ConfigDict(dict):
    """Stands in for ml_collections.ConfigDict in SEIKO's config files: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    __setattr__ = dict.__setitem__


class TorchOnCPU:
    """torch for SEIKO's online/dataset.py, whose torch.load of the LAION weights (saved from CUDA) needs a
    map_location on a machine without CUDA."""

    load = staticmethod(functools.partial(torch.load, map_location="cpu"))

    def __getattr__(self, name):
        return getattr(torch, name)


class IdentityCLIP(nn.Module):
    """Stands in for CLIP in SEIKO's scorer: the image features of the given "images" are the images themselves."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()), requires_grad=False)  # SEIKO's scorer asks its parameters' device

    @classmethod
    def from_pretrained(cls, name):
        return cls()

    def get_image_features(self, pixel_values):
        return pixel_values


class GivenRewards(nn.Module):
    """Stands in for SEIKO's scorer inside its loss: returns the rewards it is given in the place of SEIKO's data."""

    def __init__(self, dtype, config):
        super().__init__()

    def forward(self, images, config, rewards):
        return rewards


class FakeUNet(nn.Module):
    """A "UNet" whose LoRA adds a term that depends on t and the prompt but not on x_t: then each step's KL does not
    depend on the sampled noise, and the two codes' path KLs can be compared though each draws its own noise."""

    def __init__(self, generator):
        super().__init__()
        # unused, but its initialisation draws from the global generator, as SEIKO's label noise does after it: kept
        # so that the recorded numbers (docs/braid.md, seeds 0 and 1) come out again
        self.conv_in = nn.Conv2d(4, 4, 1)
        self.delta = nn.Parameter(0.1 * torch.randn(1, 4, 8, 8, generator=generator))
        self.adapters = True

    def disable_adapters(self):
        self.adapters = False

    def enable_adapters(self):
        self.adapters = True

    def forward(self, latents, t, encoder_hidden_states):
        eps = 0.1 * latents + encoder_hidden_states[:, :1, :1, None]
        if self.adapters:
            eps = eps + self.delta * (1 + encoder_hidden_states[:, :1, 1:2, None]) * float(t) / 1000
        return SimpleNamespace(sample=eps)


class FakeModel(StableDiffusion):
    """braid.py's sampler reads the model through Model.predict (guidance, the LoRA switched off for the pretrained
    model's output) and Model.schedule only: here they run on FakeUNet and SD 1.x's DDIM scheduler, with
    `negative_embeds` as the unconditional conditioning."""

    def __init__(self, unet, scheduler, negative_embeds):
        self.denoiser, self.scheduler, self.dtype, self.device = unet, scheduler, torch.float32, torch.device("cpu")
        self.prediction_type, self.schedules, self.uncond = "epsilon", {}, Conditioning(negative_embeds)


def copy_linears(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copies the weights of braid.py's RewardHead into SEIKO's MLPDiff or BaseNetwork (the same layers in order)."""
    pairs = zip(*[[m for m in net.modules() if isinstance(m, nn.Linear)] for net in (source, target)], strict=True)
    for a, b in pairs:
        b.load_state_dict(a.state_dict())
    return target.eval()


if __name__ == "__main__":
    args = tyro.cli(Args)
    seiko = Path(args.seiko_dir or ".")
    if not args.seiko_dir:
        fail("--seiko-dir must name a checkout of zhaoyl18/SEIKO (git clone https://github.com/zhaoyl18/SEIKO)")
    if not (seiko / "online" / "online_main.py").is_file():
        fail(f"--seiko-dir {args.seiko_dir} is not a checkout of zhaoyl18/SEIKO: it has no online/online_main.py")
    if min(args.sizes) < 2 or args.queries < 1:
        fail("--sizes must all be at least 2 (a covariance needs two points) and --queries at least 1")
    git = subprocess.run(["git", "-C", str(seiko), "rev-parse", "HEAD"], capture_output=True, text=True)
    results = {"seiko_commit": git.stdout.strip() if (seiko / ".git").exists() else None, "torch": torch.__version__}
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # SEIKO's label noise and DDIM noise come from the global generator
    braid = runpy.run_path(str(ROOT / "braid.py"))  # its definitions; training sits under __main__
    defaults = braid["Args"]()

    # SEIKO's aesthetic configs (config/UCB.py and config/Bootstrap.py differ in `optimism` only), with one GPU
    stubs = {"ml_collections": SimpleNamespace(ConfigDict=ConfigDict), "os": SimpleNamespace(environ={})}
    configs = [definitions(seiko / "config" / f"{name}.py", ["general", "set_config_batch", "aesthetic"], stubs)
               for name in ("UCB", "Bootstrap")]  # fmt: skip
    ucb, boot = (config["aesthetic"]() for config in configs)
    # its reward models and its data (which labels new points with the LAION aesthetic predictor plus noise)
    code = {"torch": torch, "nn": nn, "CLIPModel": IdentityCLIP}
    code = definitions(seiko / "aesthetic_scorer.py", ["MLPDiff", "online_AestheticScorerDiff"], code)
    code = definitions(seiko / "reward_aesthetic" / "train_bootstrap.py", ["BaseNetwork", "BootstrappedNetwork"], code)
    code = definitions(seiko / "online" / "dataset.py", ["D_explored"],
                       code | {"torch": TorchOnCPU(), "ASSETS_PATH": seiko / "assets"})  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # 1. The loss: the weights of the reward and of the KL, d loss / d r and d loss / d KL of each code at its
    # defaults. SEIKO: online/model_utils.py `online_aesthetic_loss_fn` (the reward term, with the config's
    # aesthetic_target and grad_scale) and three lines of online/online_main.py `main` (the KL summed over the steps,
    # loss_coeff, kl_weight). Ours: the loss line of braid.py's training loop.
    batch, steps = 8, 50
    rewards = (5 + torch.randn(batch, generator=generator)).requires_grad_()  # aesthetic scores, below SEIKO's target
    kl_terms_per_step = (1e-3 * torch.rand(steps, batch, generator=generator)).requires_grad_()  # (T, B)
    identity = SimpleNamespace(Normalize=lambda *a, **k: lambda x: x, Resize=lambda *a, **k: lambda x: x)
    stubs = {
        "torch": torch,
        "torchvision": SimpleNamespace(transforms=identity),
        "online_AestheticScorerDiff": GivenRewards,
    }
    loss_fn = definitions(seiko / "online" / "model_utils.py", ["online_aesthetic_loss_fn"], stubs)
    loss_fn = loss_fn["online_aesthetic_loss_fn"](ucb.aesthetic_target, ucb.grad_scale, ucb, "cpu", None, torch.float32)
    main = seiko / "online" / "online_main.py"
    kl_line, loss_line, total_line = (statement(main, p) for p in ["kl_loss += ", "loss = loss.mean()", "total_loss ="])
    images = torch.zeros(batch, 3, 8, 8)  # unused: the stub scorer returns `rewards`
    namespace = dict(torch=torch, config=ucb, inference_dtype=torch.float32, kl_loss=0)
    for kl_terms in kl_terms_per_step:  # SEIKO's loop over the steps, of which one line is run
        namespace["kl_terms"] = kl_terms
        exec(kl_line, namespace)
    namespace["loss"], _ = loss_fn(images, ucb, rewards)
    exec(loss_line, namespace)
    exec(total_line, namespace)
    seiko_grads = torch.autograd.grad(namespace["total_loss"], [rewards, kl_terms_per_step])
    namespace = dict(rewards=rewards, kl=kl_terms_per_step.sum(0), args=defaults)  # braid's kl is summed over steps
    exec(statement(ROOT / "braid.py", "loss = (-rewards"), namespace)
    ours_grads = torch.autograd.grad(namespace["loss"], [rewards, kl_terms_per_step])
    loss = {}
    for name, (grad_reward, grad_kl) in (("seiko", seiko_grads), ("ours", ours_grads)):
        # loss = mean_b(-w_r r_b + w_kl KL_b): d loss / d r_b = -w_r / B, d loss / d KL_b = w_kl / B
        loss[name] = {"reward_weight": -batch * grad_reward.mean().item(), "kl_weight": batch * grad_kl.mean().item()}
        loss[name]["kl_to_reward"] = loss[name]["kl_weight"] / loss[name]["reward_weight"]
    above = torch.tensor([ucb.aesthetic_target + 0.5], requires_grad=True)  # SEIKO's reward term is |r - target|
    grad_above = torch.autograd.grad(loss_fn(images[:1], ucb, above)[0].sum(), above)[0]
    loss["seiko"]["reward_weight_above_target"] = -grad_above.item() * ucb.train.loss_coeff

    # The path KL is the same quantity: SEIKO's diffusers_patch/ddim_with_kl.py `ddim_step_KL` in `main`'s loop
    # (guided noise of the trained and the reference model; its line sums the batch means) against braid.py's
    # `sample_with_kl`, on a fake UNet with SD 1.x's DDIM schedule, 50 steps, guidance 7.5, eta 1
    uses = dict(torch=torch, math=math, Optional=Optional, Tuple=Tuple, Union=Union, DDIMScheduler=DDIMScheduler,
                DDIMSchedulerOutput=DDIMSchedulerOutput, randn_tensor=randn_tensor)  # fmt: skip
    kl_step = definitions(seiko / "diffusers_patch" / "ddim_with_kl.py", ["ddim_step_KL"], uses)["ddim_step_KL"]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    unet = FakeUNet(generator)
    x_T, prompt_embeds = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 2, 3, generator=generator)
    model = FakeModel(unet, scheduler, negative_embeds=torch.randn(1, 2, 3, generator=generator))
    cond = Conditioning(prompt_embeds)
    scheduler.set_timesteps(steps)
    latents, namespace = x_T, dict(torch=torch, inference_dtype=torch.float32, kl_loss=0)
    for t in scheduler.timesteps:  # the guided outputs of both models, from the same Model.predict as braid.py's
        noise_pred = model.predict(latents, t, cond, ucb.sd_guidance_scale)
        old_noise_pred = model.predict(latents, t, cond, ucb.sd_guidance_scale, pretrained=True)
        latents, namespace["kl_terms"] = kl_step(scheduler, noise_pred, old_noise_pred, t, latents, eta=ucb.sample_eta)
        exec(kl_line, namespace)
    generators = [torch.Generator().manual_seed(i) for i in range(len(x_T))]
    _, kl = braid["sample_with_kl"](model, x_T, cond, steps, ucb.sd_guidance_scale, ucb.sample_eta, steps, generators)
    loss["path_kl"] = {"seiko": namespace["kl_loss"].item(), "ours": kl.mean().item()}
    results["loss"] = loss

    # ------------------------------------------------------------------------------------------------------------
    # 2. The bonus. SEIKO: aesthetic_scorer.py `online_AestheticScorerDiff.__call__` (optimism 'UCB'), with the
    # covariance of online/dataset.py `D_explored.cov`. Ours: braid.py `ConservativeReward` (bonus) at c = 1. Both
    # heads hold the same weights: braid.fit_head's, fitted on SEIKO's synthetic labels (its LAION labeler plus noise,
    # `D_explored.update`). Features: unit vectors in 768 dimensions, as L2-normalised CLIP embeddings are; the
    # queries are not in the data.
    num_data = max(*args.sizes, 1024)  # the heads are fitted on the first 1024
    features = F.normalize(torch.randn(num_data + args.queries, 768, generator=generator), dim=1)
    data, queries = features[:num_data], features[num_data:]
    dataset = code["D_explored"](ucb, "cpu")
    dataset.update(data)  # labels: y = labeler(x) + 0.1 N(0, 1)
    labels = dataset.y[:, 0]
    head = braid["fit_head"](data[:1024], labels[:1024], args.head_steps, 1e-3, generator)
    dataset.model = copy_linears(head, dataset.model)
    scorer = code["online_AestheticScorerDiff"](torch.float32, ucb)
    results["bonus"] = []
    with torch.no_grad():
        for n in args.sizes:
            dataset.x = data[:n]
            optimistic, proxy_seiko = scorer(queries, ucb, dataset), dataset.model(queries).squeeze(1)
            seiko_bonus = (optimistic - proxy_seiko) / ucb.train.osm_alpha  # SEIKO adds osm_alpha * its bonus
            conservative, proxy = braid["ConservativeReward"]([head], 1.0, data[:n], defaults.bonus_lambda)(queries)
            ours_bonus = proxy - conservative  # braid.py subtracts c * its bonus
            ratio = seiko_bonus / ours_bonus
            # what makes the ratio differ from sqrt(N - 1): the same two widths without lambda (written here, in
            # float64) leave the centring alone; and the features' covariance, against SEIKO's lambda
            f, q = head(data[:n])[1].double(), head(queries)[1].double()  # (N, 16), (Q, 16)
            cov = torch.cov(f.T)
            width = lambda matrix: ((q @ torch.linalg.inv(matrix)) * q).sum(-1).sqrt()  # noqa: E731
            without_lambda = (width(cov) / width(f.T @ f)).median().item()
            eigenvalues = torch.linalg.eigvalsh(cov)
            results["bonus"].append({
                "n": n, "ratio_median": ratio.median().item(), "ratio_min": ratio.min().item(),
                "ratio_max": ratio.max().item(), "ratio_over_sqrt_n_minus_1": ratio.median().item() / math.sqrt(n - 1),
                "without_lambda_over_sqrt_n_minus_1": without_lambda / math.sqrt(n - 1),
                "seiko_bonus_median": seiko_bonus.median().item(), "ours_bonus_median": ours_bonus.median().item(),
                "seiko_clipped": int((optimistic - proxy_seiko >= ucb.train.osm_clipping).sum()),
                "proxy_max_abs_diff": (proxy - proxy_seiko).abs().max().item(),  # the same head on both sides
                "cov_eigenvalue_min": eigenvalues[0].item(), "cov_eigenvalue_max": eigenvalues[-1].item(),
            })  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # 3. The bootstrap aggregate. SEIKO: `online_AestheticScorerDiff.__call__` (optimism 'bootstrap') over the heads
    # of reward_aesthetic/train_bootstrap.py `BootstrappedNetwork` (4, fixed in `D_explored`). Ours:
    # `ConservativeReward` (boot) at c = 1, and the minimum over the heads. The same heads on both sides, each fitted
    # by braid.fit_head on a bootstrap resample of the first 1024 data points, as braid.py resamples.
    dataset = code["D_explored"](boot, "cpu")
    resamples = [torch.randint(1024, (1024,), generator=generator) for _ in dataset.model.models]
    heads = [braid["fit_head"](data[i], labels[i], args.head_steps, 1e-3, generator) for i in resamples]
    for ours_head, seiko_head in zip(heads, dataset.model.models):
        copy_linears(ours_head, seiko_head)
    dataset.model.eval()
    scorer = code["online_AestheticScorerDiff"](torch.float32, boot)
    with torch.no_grad():
        seiko_reward = scorer(queries, boot, dataset)
        predictions = torch.stack([h(queries)[0] for h in heads])  # (M, Q)
        conservative, proxy = braid["ConservativeReward"](heads, 1.0)(queries)
        std = predictions.std(0)  # n - 1 denominator, as ConservativeReward's
        results["bootstrap"] = {
            "heads": len(heads),
            "seiko_minus_mean_over_std": ((seiko_reward - proxy) / std).mean().item(),
            "ours_minus_mean_over_std": ((conservative - proxy) / std).mean().item(),
            "min_minus_mean_over_std": ((predictions.min(0).values - proxy) / std).mean().item(),
            "seiko_is_max": torch.allclose(seiko_reward, predictions.max(0).values, atol=1e-5),
            "std_median": std.median().item(),
        }

    # ------------------------------------------------------------------------------------------------------------
    # SEIKO's defaults in braid.py's flags
    seiko_loss, ours_loss = loss["seiko"], loss["ours"]
    scale = ours_loss["reward_weight"] / seiko_loss["reward_weight"]  # our gradients are this many times SEIKO's
    results["conversion"] = {
        "kl_weight": seiko_loss["kl_to_reward"] * ours_loss["reward_weight"],  # SEIKO's KL-to-reward ratio
        "max_grad_norm": ucb.train.max_grad_norm * scale,  # SEIKO's clip, for gradients `scale` times larger
        "c_bonus": {b["n"]: ucb.train.osm_alpha * b["ratio_median"] for b in results["bonus"]},
        "c_bootstrap_min": -results["bootstrap"]["min_minus_mean_over_std"],
    }

    # TRY NOT TO MODIFY: the report
    print(f"SEIKO {results['seiko_commit']}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print("1. the loss at the defaults   reward weight   KL weight   KL / reward")
    for name, row in (("SEIKO (config/UCB.py)", seiko_loss), ("ours (braid.py)", ours_loss)):
        print(f"   {name:<26}{row['reward_weight']:>13.4g}{row['kl_weight']:>12.4g}{row['kl_to_reward']:>14.4g}")
    print(f"   SEIKO's reward term is |r - {ucb.aesthetic_target}|: above {ucb.aesthetic_target} its reward weight is"
          f" {seiko_loss['reward_weight_above_target']:.4g}")  # fmt: skip
    print(f"   the path KL of one case: SEIKO {loss['path_kl']['seiko']:.6g}, ours {loss['path_kl']['ours']:.6g}")
    print("2. the bonus, N: SEIKO's, ours (medians); SEIKO's / ours: median (min-max), / sqrt(N - 1), the same"
          " without lambda; SEIKO clipped")  # fmt: skip
    for b in results["bonus"]:
        print(f"   {b['n']:>6}: {b['seiko_bonus_median']:.4g}, {b['ours_bonus_median']:.4g}; {b['ratio_median']:.4g}"
              f" ({b['ratio_min']:.4g}-{b['ratio_max']:.4g}), {b['ratio_over_sqrt_n_minus_1']:.3g},"
              f" {b['without_lambda_over_sqrt_n_minus_1']:.3g}; {b['seiko_clipped']}")  # fmt: skip
    eigenvalues = [x for b in results["bonus"] for x in (b["cov_eigenvalue_min"], b["cov_eigenvalue_max"])]
    print(f"   the features' covariance has eigenvalues {min(eigenvalues):.2g} to {max(eigenvalues):.2g}"
          f" (SEIKO's lambda: {ucb.train.osm_lambda})")  # fmt: skip
    aggregate = results["bootstrap"]
    print(f"3. the bootstrap over {aggregate['heads']} heads, (aggregate - mean) / std: SEIKO's"
          f" {aggregate['seiko_minus_mean_over_std']:+.3f} (the maximum: {aggregate['seiko_is_max']}), ours (c = 1)"
          f" {aggregate['ours_minus_mean_over_std']:+.3f}, the minimum"
          f" {aggregate['min_minus_mean_over_std']:+.3f}")  # fmt: skip
    conversion = results["conversion"]
    c_bonus = ", ".join(f"{c:.3g} at N = {n}" for n, c in conversion["c_bonus"].items())
    print(f"In braid.py's flags: SEIKO's KL-to-reward ratio is --kl-weight {conversion['kl_weight']:.4g}, its clip"
          f" --max-grad-norm {conversion['max_grad_norm']:.4g}; its bonus weight {ucb.train.osm_alpha} is --c"
          f" {c_bonus} (the opposite sign); the minimum over the heads is"
          f" --c {conversion['c_bootstrap_min']:.3g}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
