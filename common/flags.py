"""The flags every script shares (RunArgs: the run, the model, the prompts and the sampler, all that common/ reads from
a script's Args), and the types that say what a flag may be: `batch_size: Count = 4` is an int that `cli` checks is
1 to a million, and `learning_rate: Resumable[LearningRate]` one that a resumed run may change."""

import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Optional, TypeVar


@dataclass(frozen=True)
class Allowed:
    """A flag's allowed values: `test(value)` holds for them, and `what` names them in the error sentence."""

    test: Callable[[Any], bool]
    what: str


@dataclass(frozen=True)
class CanChangeOnResume:
    """A flag that a resumed run may change: it extends, logs or places the run, or sets the optimizer (whose restored
    state takes this run's values). Any other flag that differs from the checkpoint's would mix two runs."""


T = TypeVar("T")
Resumable = Annotated[T, CanChangeOnResume()]
# a count (a batch size, steps, epochs): one past a million is a typo, and would fail late, out of memory or time
Count = Annotated[int, Allowed(lambda x: 1 <= x <= 10**6, "between 1 and 1000000")]
AtLeast1 = Annotated[int, Allowed(lambda x: x >= 1, "at least 1")]
Positive = Annotated[float, Allowed(lambda x: 0 < x < float("inf"), "a positive number")]
AtLeast0 = Annotated[float, Allowed(lambda x: 0 <= x < float("inf"), "at least 0")]  # NaN fails every comparison
LearningRate = Annotated[float, Allowed(lambda x: 0 < x <= 1, "in (0, 1]")]
Eta = Annotated[float, Allowed(lambda x: 0 <= x <= 1, "between 0 and 1")]
Guidance = Annotated[float, Allowed(lambda x: 1 <= x < float("inf"), "at least 1 (1: no guidance)")]
LoraRank = Annotated[int, Allowed(lambda x: 1 <= x <= 1024, "between 1 and 1024")]


def metadata(args_class: type) -> dict[str, tuple]:
    """Each field's annotations beyond its type (Allowed, CanChangeOnResume), by name."""
    hints = typing.get_type_hints(args_class, include_extras=True)
    return {name: getattr(hint, "__metadata__", ()) for name, hint in hints.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The flags every script shares

SD14 = "CompVis/stable-diffusion-v1-4"


def script_name() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


# a name that goes into the run folder's: letters, digits and a few marks, not a path
ExperimentName = Annotated[
    str,
    Allowed(
        lambda x: bool(re.fullmatch(r"[\w.+-]{1,100}", x)) and set(x) != {"."}, "1 to 100 letters, digits, _ . + -"
    ),
]


@dataclass
class RunArgs:
    """The flags every script shares, in the order `--help` lists them: the run, then the model, the prompts and the
    sampler. Each script's Args extends it with its reward, its method's flags and, where its method needs other
    defaults, its own values of a few of these (save_every, sample_every, guidance_scale, eta)."""

    preset: Literal["sd14", "tiny"] = "sd14"
    """sd14: the paper's setting on SD 1.4 (a GPU); tiny: the shipped tiny model on the CPU (flags still apply)"""
    exp_name: ExperimentName = field(default_factory=script_name)
    """the name of this experiment"""
    seed: Annotated[int, Allowed(lambda x: 0 <= x < 2**32, "between 0 and 2**32 - 1")] = 1
    """seed of the experiment"""
    torch_deterministic: Resumable[bool] = True
    """cuDNN's deterministic kernels (--no-torch-deterministic: faster, not reproducible to the bit)"""
    cuda: Resumable[bool] = True
    """use a CUDA device when there is one (--no-cuda: the CPU)"""
    cpu_threads: Resumable[Annotated[Optional[int], Allowed(lambda x: x is None or x >= 1, "at least 1")]] = None
    """torch's threads on the CPU (None: torch's default, every core; --preset tiny: 1, docs/RUNS.md says why)"""
    track: Resumable[bool] = False
    """also log to Weights and Biases (pip install wandb)"""
    wandb_project_name: Resumable[str] = "diffusion-reward-finetuning"
    """the wandb's project name"""
    wandb_entity: Resumable[Optional[str]] = None
    """the entity (team) of wandb's project"""
    output_dir: Annotated[str, Allowed(lambda x: bool(x.strip()), "a folder's path, not empty")] = "runs"
    """the run folder is {output_dir}/{run_name}"""
    save_every: Resumable[AtLeast1] = 500
    """save a checkpoint (LoRA, optimizer, counter, RNG) every this many optimizer steps"""
    sample_every: Resumable[AtLeast1] = 100
    """save a grid of fixed-seed samples on held-out prompts every this many optimizer steps"""
    push_to_hub: Resumable[bool] = False
    """upload the final LoRA and its model card to the Hugging Face Hub (checked before training: a token is needed)"""
    hub_model_id: Resumable[Optional[str]] = None
    """the Hub repository to upload to, user/name (None: the run folder's name, under your account)"""
    resume: Resumable[Optional[str]] = None
    """a checkpoint folder (runs/.../checkpoints/step_000100) or a run folder (its latest checkpoint)"""

    # Model, prompts and sampler
    pretrained_model: str = SD14
    """hub id or local folder of a diffusers pipeline: SD 1.x or 2.x, SDXL, SD 3 or 3.5, FLUX.1, Qwen-Image"""
    revision: Optional[str] = None
    """the model's revision on the hub"""
    t5: bool = True
    """use the T5 text encoder of a model that has one (SD 3); --no-t5 leaves it out (~9 GB less at SD 3.5 scale)"""
    free_text_encoders: Resumable[bool] = False
    """encode the training and held-out prompts once, then free the text encoders' memory (docs/RUNS.md)"""
    gradient_checkpointing: Resumable[bool] = False
    """recompute each denoiser block in the backward pass instead of keeping its activations (docs/RUNS.md)"""
    prompts: Literal[
        "simple_animals", "nouns_activities", "geneval", "shapes", "shapes_seen", "shapes_unseen"
    ] = "simple_animals"  # fmt: skip
    """the prompt set"""
    prompt_file: Optional[str] = None
    """a file of prompts, one per line, instead of --prompts"""
    validation_prompts: tuple[str, ...] = ()
    """prompts or files of them for the grids and the held-out reward (none given: 4 held out of --prompts)"""
    num_steps: AtLeast1 = 50
    """DDIM sampling steps"""
    guidance_scale: Guidance = 7.5
    """classifier-free guidance weight (FLUX.1-dev: its guidance input, 3.5 in its pipeline; FLUX.1-schnell: none)"""
    eta: Eta = 0.0
    """DDIM eta (0: deterministic sampling)"""
    resolution: Annotated[int, Allowed(lambda x: 1 <= x <= 16384, "between 1 and 16384")] = 512
    """image height and width in pixels"""
    mixed_precision: Resumable[Literal["auto", "bf16", "no"]] = "auto"
    """dtype of the frozen weights: bf16, no (fp32), or auto (bf16 on CUDA, fp32 on the CPU); the LoRA stays fp32"""

    def refused(self) -> str | None:
        """What no single flag's type can say: a combination of flags that is refused, in one sentence, or None."""
        if self.hub_model_id is not None and not self.push_to_hub:
            return (
                "--hub-model-id names where --push-to-hub uploads, and --push-to-hub is not given: add it or drop both"
            )
        return None
