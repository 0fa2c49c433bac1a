"""Where code outside a script observes or changes a run (the benchmarks: counting denoiser calls, timing the loop,
switching a speed lever on), instead of replacing a function of common/. Each is a list of callables, empty in a
script's own run; a benchmark appends to one before it runs a script in its process."""

# f(model) -> None, for each model load_model returns (e.g. a forward pre-hook on model.denoiser)
model_loaded = []
# f(model) -> None, after Model.add_lora has added the LoRA (e.g. compiling the denoiser with it)
lora_added = []
# f(iterable) -> iterable, wrapping the training loop's counter (Run.steps) after the run's first evaluation
training_loop = []
# f(reward) -> None, for each reward make_reward returns (e.g. timing its forward and backward)
reward_made = []
