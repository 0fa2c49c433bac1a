"""The LoRA on a model's denoiser (peft): added with B = 0, so that training starts from the pretrained model, kept in
fp32; saved in diffusers' format, which the family's pipeline `load_lora_weights` reads, and loaded back to resume;
and the denoiser's block-wise gradient checkpointing, which has to switch the LoRA as it was in each call; and an
exponential moving average of the LoRA (EMA)."""

from contextlib import contextmanager

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.checkpoint import checkpoint

from common import hooks
from common.cli import fail

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights finds it


class Lora:
    """Model's LoRA methods; a family sets `lora_targets`, `lora_prefix` and `lora_loader` (common/models.py)."""

    def add_lora(self, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
        """LoRA (peft) on the denoiser's attention projections; B starts at zero, so the model starts as the
        pretrained one. The trainable parameters are kept in fp32 whatever the frozen weights' dtype. Returns them."""
        targets = self.lora_targets
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
        self.denoiser.add_adapter(config)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        for hook in hooks.lora_added:
            hook(self)
        return params

    def save_lora(self, directory: str) -> None:
        """Write `pytorch_lora_weights.safetensors` in diffusers' format, with the LoRA config (rank, alpha) in its
        metadata: the family's pipeline `.from_pretrained(base).load_lora_weights(directory)` loads it."""
        state_dict = get_peft_model_state_dict(self.denoiser)
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(
                f"the LoRA's weights are not finite, so they were not saved to {directory}: try a lower --learning-rate"
            )
        if self.lora_prefix == "unet":  # the UNet pipelines' own (older) key names, as diffusers' LoRA examples save
            state_dict = convert_state_dict_to_diffusers(state_dict)
        config = self.denoiser.peft_config["default"].to_dict()
        layers = {f"{self.lora_prefix}_lora_layers": state_dict, f"{self.lora_prefix}_lora_adapter_metadata": config}
        self.lora_loader.save_lora_weights(directory, **layers)

    def load_lora(self, directory: str) -> None:
        """Load weights written by `save_lora` into a LoRA that `add_lora` gave the same rank (to resume). A file that
        cannot be read or holds non-finite weights ends the program with one sentence."""
        try:
            loader = self.lora_loader.lora_state_dict
            state_dict = loader(directory, weight_name=LORA_WEIGHTS, return_lora_metadata=True)[0]
        except Exception as e:  # missing, truncated or not a safetensors file
            fail(f"the LoRA in '{directory}' cannot be read ({type(e).__name__}); resume from an earlier checkpoint")
        if not all(w.isfinite().all() for w in state_dict.values()):
            fail(f"the LoRA in '{directory}' holds non-finite weights; resume from an earlier checkpoint")
        prefix = f"{self.lora_prefix}."
        state_dict = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state_dict.items()})
        try:
            result = set_peft_model_state_dict(self.denoiser, state_dict)
        except RuntimeError:  # a size mismatch: another rank
            fail(
                f"the LoRA in '{directory}' has other shapes than this model's LoRA: was it saved with another"
                " --lora-rank?"
            )
        if result.unexpected_keys:
            key = result.unexpected_keys[0]
            fail(f"the LoRA in '{directory}' does not fit this model (unexpected keys such as {key})")

    def checkpoint_blocks(self) -> None:
        """The denoiser's own gradient checkpointing (diffusers' enable_gradient_checkpointing): a call with gradient
        keeps only each block's inputs and recomputes the block in the backward pass, which at 1024 px turns tens of
        GB of kept activations into a few (benchmarks/speed/family_memory.py) for a third forward pass where the call
        is also checkpointed. A block is recomputed with the LoRA as it was in the call (off for the pretrained
        model's output, `predict(pretrained=True)`), whatever it is when the backward pass reaches it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        def block_checkpoint(block, *args):
            lora = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
            off = bool(lora) and lora[0].disable_adapters  # the LoRA's state in the call

            def run(*inputs):
                if not lora or lora[0].disable_adapters == off:
                    return block(*inputs)
                for m in lora:
                    m.enable_adapters(not off)
                try:
                    return block(*inputs)
                finally:
                    for m in lora:
                        m.enable_adapters(off)

            return checkpoint(run, *args, use_reentrant=False)

        self.denoiser.enable_gradient_checkpointing(block_checkpoint)


class EMA:
    """An exponential moving average of the LoRA's weights, for evaluation (Flow-GRPO's recipe): after each optimizer
    step k (from 0), shadow = d shadow + (1 - d) weights with d = min(decay, (1 + k) / (10 + k)), Flow-GRPO's
    warm-up (its ema.py), so that the first steps are not averaged with the starting weights at the full decay.
    `applied()` swaps the average in for a `with` block (evaluations, the saved ema/ LoRA) and the weights back."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach(), 1 - d)  # d shadow + (1 - d) p
        self.updates += 1

    @contextmanager
    def applied(self):
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.shadow):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params, kept):
                    p.copy_(weights)

    def state_dict(self) -> dict:  # kept in every checkpoint, so that a resumed run averages as this one would
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if [s.shape for s in state["shadow"]] != [p.shape for p in self.params]:
            raise ValueError("the EMA's weights have other shapes than this LoRA's")
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params)]
        self.updates = state["updates"]
