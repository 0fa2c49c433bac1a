"""What the six scripts share, none of it a method's idea; docs/ALGORITHMS.md maps each formula to its function.

    cli          the command line (presets, --resume's own flags, each flag's allowed values) and one-sentence errors
    run          the run's lifecycle: RunArgs (the flags every script shares), processes and seeds, the run folder,
                 evaluation, metrics, checkpoints, the final LoRA
    checkpoint   run folders, locks, atomic checkpoints, resuming
    models       the model behind one interface (Model, load_model); families/ holds one module per model family
    sampling     the DDIM step on any Gaussian path, its KL, the gradient-free sampling loop
    rewards      the rewards by name and weighted sums of them; scoring in a worker thread while the next batch samples
    reward_models the rewards that are models (CLIP-based, ImageReward) and their differentiable preprocessing
    remote       a reward served over HTTP: the JSON protocol and its client (reward_server.py serves one)
    prompts      prompt sets (prompt_sets/ holds those shipped as files, with their licences) and the held-out split
    distributed  torchrun: each process's slice of a global batch, gradients averaged
    hub          a run's model card and its upload
    hooks        where a benchmark observes or changes a run from outside a script
    offline_data BRAID's data files
    shapes       the tiny models' world: drawing shapes and reading them back from pixels

Importing it changes nothing global: `cli` installs the error handling and the warning filters when a script starts.
"""
