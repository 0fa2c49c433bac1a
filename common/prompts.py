"""Prompt sets by name, a prompt file, and seedable sampling from them."""

import json
import os

import torch

from common.cli import fail

# the 45 common animals of the DDPO paper
SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]  # fmt: skip
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]
# the world of the tiny models (assets/tiny-sd, assets/tiny-sd3; common/shapes.py draws and reads it): one coloured
# shape on a plain background of another colour
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SHAPES = ["circle", "square", "triangle"]

# prompt following on combinations never trained on (the GenEval analogue): a third of the colour-shape pairs (each
# shape in two colours, each colour with one shape) held out of training, with every background
UNSEEN_PAIRS = {(c, s) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES) if (i + j) % 3 == 0}

PROMPT_SETS = {
    "simple_animals": SIMPLE_ANIMALS,
    "nouns_activities": [
        f"{'an' if animal[0] in 'aeiou' else 'a'} {animal} {activity}"
        for animal in SIMPLE_ANIMALS
        for activity in ACTIVITIES
    ],
    "shapes": [
        f"a {colour} {shape} on a {background} background"
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour
    ],
}
# sets shipped as files (common/prompt_sets/README.md gives their sources and licences)
PROMPT_SET_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_sets")


def geneval_metadata() -> list[dict]:
    """GenEval's 553 evaluation prompts with what a detector must find in each image (tag, include, exclude, ...)."""
    with open(os.path.join(PROMPT_SET_FILES, "geneval.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PROMPT_SETS["geneval"] = [record["prompt"] for record in geneval_metadata()]
PROMPT_SETS["shapes_seen"] = [p for p in PROMPT_SETS["shapes"] if tuple(p.split()[1:3]) not in UNSEEN_PAIRS]
PROMPT_SETS["shapes_unseen"] = [p for p in PROMPT_SETS["shapes"] if tuple(p.split()[1:3]) in UNSEEN_PAIRS]


def load_prompts(name: str = "simple_animals", prompt_file: str | None = None) -> list[str]:
    """The prompt set `name`, or the non-empty lines of `prompt_file` when one is given."""
    if prompt_file is None:
        if name not in PROMPT_SETS:
            fail(f"unknown prompt set '{name}'; choose one of: {', '.join(PROMPT_SETS)}, or pass --prompt-file")
        return list(PROMPT_SETS[name])
    if os.path.isdir(prompt_file):
        fail(f"the prompt file '{prompt_file}' is a folder: pass a text file, one prompt a line")
    if not os.path.exists(prompt_file):
        fail(f"the prompt file '{prompt_file}' does not exist")
    try:
        with open(prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        fail(f"the prompt file '{prompt_file}' is not UTF-8 text (byte {e.start}): pass a text file, one prompt a line")
    except OSError as e:
        fail(f"the prompt file '{prompt_file}' cannot be read ({e.strerror or e})")
    if any("\x00" in p for p in prompts):
        fail(f"the prompt file '{prompt_file}' holds NUL bytes, so it is not a text file: one prompt a line")
    if not prompts:
        fail(f"the prompt file '{prompt_file}' has no prompts (one per line)")
    return prompts


def split_prompts(prompts: list[str], validation: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts for the evaluation and its sample grids): the `validation` prompts, each a
    prompt or a file of them, with every prompt of the set trained on; or without them, 4 prompts spread through the
    set, held out of training (a set of 4 or fewer is used for both)."""
    if validation:
        return prompts, [p for v in validation for p in validation_prompt(v)]
    held_out = [round((i + 0.5) * len(prompts) / 4) for i in range(4)] if len(prompts) > 4 else []
    return [p for i, p in enumerate(prompts) if i not in held_out], [prompts[i] for i in held_out] or prompts[:4]


def validation_prompt(value: str) -> list[str]:
    """One --validation-prompts value: a prompt set's name, a file of prompts, or a prompt. A value that names a
    folder, is empty, or reads like a file's path (a path separator, a text file's extension) but names no file is
    refused, not made a prompt."""
    if value in PROMPT_SETS:
        return list(PROMPT_SETS[value])
    if os.path.isfile(value):
        return load_prompts(prompt_file=value)
    if not value.strip():
        fail("--validation-prompts has an empty value: give prompts, or files of them, one prompt a line")
    if os.path.isdir(value):
        fail(f"--validation-prompts names the folder '{value}': give prompts, or text files of them")
    if os.sep in value or "/" in value or os.path.splitext(value)[1].lower() in (".txt", ".csv", ".json", ".jsonl"):
        fail(f"--validation-prompts '{value}' reads like a file's path, but no such file exists")
    return [value]


def sample_prompts(prompts: list[str], n: int, generator: torch.Generator) -> list[str]:
    """n prompts drawn uniformly with replacement; the generator's state makes it reproducible and resumable."""
    return [prompts[i] for i in torch.randint(len(prompts), (n,), generator=generator).tolist()]
