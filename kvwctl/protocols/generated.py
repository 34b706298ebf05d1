"""MLLMU-Bench's and CLEAR's own scoring: ask with the benchmark's prompt, generate, match the text.

Both benchmarks score what the model *generates* (greedy, at most ``MAX_NEW_TOKENS`` = 50 new
tokens, as their scripts do) after a prompt of their own, rendered here through the model's chat
template (their scripts hard-code LLaVA's ``USER: <image>\\n… ASSISTANT:``, which is what that
template renders). Which samples are scored, and how, follows the sample's ``task`` (written by
``kvwctl data convert``):

MLLMU-Bench (``eval.py`` of the benchmark; zero-shot: the script's few-shot demonstrations are
drawn with an unseeded ``random.sample`` and left out here):

* ``mllmu.mc_image_acc`` / ``mllmu.mc_text_acc`` (``mc_image``, ``mc_text``: the classification
  questions with and without the image): the prompt is ``QUESTION\\nA: …\\nB: …\\nC: …\\nD: …\\nJust
  give ONE letter representing the answer directly.``; correct when the first character of the
  stripped generation, uppercased, is the correct letter;
* ``mllmu.gen_image_rougeL`` / ``mllmu.gen_text_rougeL`` (``gen_*``): ``QUESTION\\nAnswer the question
  based on your trained knowledge in one sentence accurately in ENGLISH.`` (without "accurately"
  for text), ROUGE-L F-measure (``use_stemmer=True``) of the generation against the ground truth;
* ``mllmu.fill_image_acc`` / ``mllmu.fill_text_acc`` (``fill_*``): the blank ``__`` written
  ``[Blank]``, then ``\\nPlease **ONLY** provide the correct answer that should replace the
  [Blank].``; correct when the ground truth, lowercased, is a substring of the lowercased generation.

CLEAR (the KVW authors' ``CLEAR/eval.py``):

* ``clear.name_vqa_acc`` (``name``: forget and retain persons): the question alone, no options;
  correct when the name with every character but ``[A-Za-z0-9]`` removed, lowercased, is a
  substring of the generation so reduced;
* ``clear.mc_acc`` (``mc``: real_faces, real_world): ``QUESTION\\nA. …\\nB. …\\n`` (the options in
  the converted order, placed with seed 42), correct when the first character of the reduced
  generation, uppercased, is the answer's letter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from kvwctl.data import Sample

if TYPE_CHECKING:
    from kvwctl.modeling import LoadedModel
    from kvwctl.progress import Tracker

MAX_NEW_TOKENS = 50
MC_SUFFIX = "Just give ONE letter representing the answer directly."
GEN_SUFFIX = {
    "image": "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH.",
    "text": "Answer the question based on your trained knowledge in one sentence in ENGLISH.",
}
FILL_SUFFIX = "Please **ONLY** provide the correct answer that should replace the [Blank]."


def option_letters(sample: Sample) -> tuple[list[str], str]:
    """The letters of a sample's options and the answer's letter (from the converted fields, else A, B, …)."""
    letters = sample.extra.get("option_letters") or [chr(ord("A") + index) for index in range(len(sample.options))]
    correct = sample.extra.get("correct_letter") or letters[sample.options.index(sample.answer)]
    return list(letters), str(correct)


def alphanumeric(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "", text)


# --- MLLMU-Bench ---------------------------------------------------------------------------------


def mllmu_prompt(sample: Sample, task: str) -> str:
    kind = task.rsplit("_", 1)[1]
    if task.startswith("mc_"):
        letters, _ = option_letters(sample)
        options = "\n".join(f"{letter}: {option}" for letter, option in zip(letters, sample.options, strict=True))
        return f"{sample.question}\n{options}\n{MC_SUFFIX}"
    if task.startswith("gen_"):
        return f"{sample.question}\n{GEN_SUFFIX[kind]}"
    return sample.question.replace("__", "[Blank]") + "\n" + FILL_SUFFIX


def mllmu_score(sample: Sample, task: str, generation: str) -> tuple[str, float]:
    """(metric, value) of one generation, by MLLMU-Bench's rules."""
    kind = task.rsplit("_", 1)[1]
    if task.startswith("mc_"):
        letters, correct = option_letters(sample)
        response = generation.strip()
        predicted = response[0].upper() if response and response[0].upper() in letters else None
        return f"mllmu.mc_{kind}_acc", float(predicted == correct)
    if task.startswith("gen_"):
        from kvwctl.metrics import rouge_l

        return f"mllmu.gen_{kind}_rougeL", rouge_l(sample.answer, generation.strip())[1]
    return f"mllmu.fill_{kind}_acc", float(sample.answer.lower() in generation.strip().lower())


MLLMU_TASKS = ("mc_image", "mc_text", "gen_image", "gen_text", "fill_image", "fill_text")
MLLMU_METRICS = tuple(
    f"mllmu.{name}"
    for name in (
        "mc_image_acc",
        "mc_text_acc",
        "gen_image_rougeL",
        "gen_text_rougeL",
        "fill_image_acc",
        "fill_text_acc",
    )
)

# --- CLEAR ---------------------------------------------------------------------------------------


def clear_prompt(sample: Sample, task: str) -> str:
    if task == "mc":
        letters, _ = option_letters(sample)
        options = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, sample.options, strict=True))
        return f"{sample.question}\n{options}\n"
    return sample.question


def clear_score(sample: Sample, task: str, generation: str) -> tuple[str, float]:
    response = alphanumeric(generation)
    if task == "mc":
        _, correct = option_letters(sample)
        predicted = response[0].upper() if response else None
        return "clear.mc_acc", float(predicted == correct)
    return "clear.name_vqa_acc", float(alphanumeric(sample.answer).lower() in response.lower())


CLEAR_TASKS = ("name", "mc")
CLEAR_METRICS = ("clear.name_vqa_acc", "clear.mc_acc")


# --- both ----------------------------------------------------------------------------------------

Prompt = Callable[[Sample, str], str]
Score = Callable[[Sample, str, str], tuple[str, float]]


def generated_values(
    loaded: LoadedModel,
    samples: list[Sample],
    *,
    tasks: tuple[str, ...],
    prompt: Prompt,
    score: Score,
    batch_size: int,
    tracker: Tracker,
    description: str,
) -> tuple[dict[str, list[float]], dict[str, tuple[str, str, float]]]:
    """Per metric its per-sample values, and per sample id (prompt's generation, metric, value)."""
    from kvwctl.evaluate import generate_answers

    chosen = [sample for sample in samples if sample.extra.get("task") in tasks]
    values: dict[str, list[float]] = {}
    details: dict[str, tuple[str, str, float]] = {}
    if not chosen:
        return values, details
    # A text task is asked without its image (MLLMU's Pure_Text questions), whatever the sample holds.
    asked = [
        replace(
            sample,
            question=prompt(sample, str(sample.extra["task"])),
            images=() if str(sample.extra["task"]).endswith("_text") else sample.images,
        )
        for sample in chosen
    ]
    generations = generate_answers(
        loaded, asked, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, tracker=tracker, description=description
    )
    for sample, generation in zip(chosen, generations, strict=True):
        metric, value = score(sample, str(sample.extra["task"]), generation)
        values.setdefault(metric, []).append(value)
        details[sample.id] = (generation, metric, value)
    return values, details
