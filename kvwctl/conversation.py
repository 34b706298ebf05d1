"""The token sequence the model sees for a sample, and where its answer is in it (DESIGN §1).

A sample is rendered with the model's own chat template as
``[user: (image,) question] [assistant: answer]``. Three details decide whether the hidden
states we profile are the ones the model produces in use:

* **Exactly one BOS.** Some templates write the BOS token themselves (Llama 3, Gemma, SmolLM);
  others leave it to the tokenizer (LLaVA-1.5). We tokenize the rendered text *with* the
  tokenizer's special tokens unless the text already starts with the BOS token, and check that the
  result does not start with two.
* **The answer is located in the assistant turn**, by character offsets: the rendered prompt
  (with the generation prompt) must be a prefix of the rendered conversation, and the answer is
  searched for after it. BPE tokenizers may split the answer differently inside the
  conversation than alone, so answer tokens are the tokens whose ``offset_mapping`` overlaps the
  answer's characters, never a match of the answer's own token ids.
* **Content format.** Multimodal templates take a list of parts (``{"type": "image"}``,
  ``{"type": "text", ...}``); many text-only templates accept only a plain string.

A conversation longer than the model's context (``max_position_embeddings``) is refused as a
data error naming the sample, when it is rendered: every stage renders all its samples before its
first forward pass.

For generation (``kvwctl eval``) the same prompt is rendered alone, ending with the template's
generation prompt, and tokenized by the same BOS rule (``render_prompt``).

Processors expand image placeholders into many image tokens, all of them before the answer, so
answer positions are recorded as a distance from the end of the sequence and checked against the
processor's ids.

PaliGemma has no chat template and takes the answer as its processor's ``suffix=``: its renderer,
a ``ChatRenderer`` without a template, is ``kvwctl.prefix_suffix.PrefixSuffixRenderer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvwctl.data import Sample
from kvwctl.errors import DataError, ModelError

POSITION_MODES = ("answer", "answer-tokens", "all")


@dataclass(frozen=True)
class RenderedPrompt:
    """A sample's prompt, ending with the template's generation prompt: what ``generate`` continues."""

    sample: Sample
    text: str
    add_special_tokens: bool


@dataclass(frozen=True)
class RenderedSample:
    """A sample rendered and tokenized without image expansion."""

    sample: Sample
    text: str  # the whole conversation, as the chat template renders it
    add_special_tokens: bool
    token_ids: tuple[int, ...]
    answer_start: int  # index of the first answer token in token_ids
    answer_length: int  # number of answer tokens
    suffix: str | None = None  # the processor's suffix= (PaliGemma: the answer), None when text holds it

    @property
    def suffix_length(self) -> int:
        """Tokens from the first answer token to the end of the sequence."""
        return len(self.token_ids) - self.answer_start


class ChatRenderer:
    """Renders samples with a model's chat template and locates their answers."""

    uses_chat_template = True  # PaliGemma's renderer (kvwctl.prefix_suffix) has none

    def __init__(
        self, processor: Any, *, multimodal: bool, max_tokens: int | None = None, image_required: str | None = None
    ) -> None:
        self.processor = processor
        self.image_required = image_required  # why every sample needs an image (Mllama), or None
        self.max_tokens = max_tokens  # the model's context; a longer sample is refused
        self.tokenizer = processor.tokenizer if multimodal else processor
        self.multimodal = multimodal
        has_template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if self.uses_chat_template and not has_template:
            raise ModelError(
                "the model's processor/tokenizer has no chat template",
                hint="kvwctl renders samples with the model's own chat template; add chat_template.jinja",
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelError("the model's tokenizer is not a fast tokenizer; answer offsets need one")
        if self.tokenizer.pad_token is None:
            # Many tokenizers (Llama 2/3) define none. Batches are padded (on the right for teacher
            # forcing, on the left for generation) and padding is masked out of attention, profiling
            # and scoring, so the id does not matter; generated pads decode as special tokens.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.bos_token = self.tokenizer.bos_token
        self.bos_token_id = self.tokenizer.bos_token_id

    def messages(self, sample: Sample, *, with_answer: bool) -> list[dict[str, Any]]:
        if self.image_required and not sample.images:
            raise DataError(f"{sample.source}: image: sample {sample.id!r} has none; {self.image_required}")
        if self.multimodal:
            user: Any = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question}]
            assistant: Any = [{"type": "text", "text": sample.answer}]
        else:
            if sample.images:
                raise DataError(f"{sample.source}: image: the model is text-only and cannot take images")
            user, assistant = sample.question, sample.answer
        messages = [{"role": "user", "content": user}]
        if with_answer:
            messages.append({"role": "assistant", "content": assistant})
        return messages

    def prompt_text(self, sample: Sample) -> str:
        """The rendered prompt, ending with the template's generation prompt."""
        return self._render(self.messages(sample, with_answer=False), generation_prompt=True)

    def render_prompt(self, sample: Sample) -> RenderedPrompt:
        """The prompt for generation, tokenized the way ``render`` tokenizes the whole conversation."""
        text = self.prompt_text(sample)
        add_special_tokens = self.add_special_tokens(text)
        token_ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        self.check_bos(token_ids, sample)
        return RenderedPrompt(sample=sample, text=text, add_special_tokens=add_special_tokens)

    def add_special_tokens(self, text: str) -> bool:
        """Whether tokenizing ``text`` should add special tokens: not if the template wrote BOS."""
        return not (self.bos_token is not None and text.startswith(self.bos_token))

    def render(self, sample: Sample) -> RenderedSample:
        prompt = self.prompt_text(sample)
        text = self._render(self.messages(sample, with_answer=True), generation_prompt=False)
        if not text.startswith(prompt):
            raise ModelError(
                f"{sample.source}: cannot locate the answer of sample {sample.id!r}: the chat template "
                "renders the prompt differently once the answer is added",
            )
        char_start = text.find(sample.answer, len(prompt))
        if char_start < 0:
            raise DataError(
                f"{sample.source}: cannot locate the answer of sample {sample.id!r} in the assistant "
                "turn of the rendered conversation",
                hint="the chat template changed the answer text (e.g. stripped or escaped it)",
            )
        char_end = char_start + len(sample.answer)
        add_special_tokens = self.add_special_tokens(text)
        encoding = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        token_ids = list(encoding["input_ids"])
        answer_tokens = [
            index
            for index, (start, end) in enumerate(encoding["offset_mapping"])
            if end > start and start < char_end and end > char_start
        ]
        if not answer_tokens or answer_tokens != list(range(answer_tokens[0], answer_tokens[-1] + 1)):
            raise DataError(f"{sample.source}: cannot map the answer of sample {sample.id!r} to tokens")
        if answer_tokens[0] == 0:
            raise DataError(f"{sample.source}: sample {sample.id!r} has no prompt tokens before its answer")
        self.check_bos(token_ids, sample)
        self.check_length(len(token_ids), sample)
        return RenderedSample(
            sample=sample,
            text=text,
            add_special_tokens=add_special_tokens,
            token_ids=tuple(token_ids),
            answer_start=answer_tokens[0],
            answer_length=len(answer_tokens),
        )

    def check_length(self, num_tokens: int, sample: Sample) -> None:
        """Refuse a conversation longer than the model's context, before any forward pass.

        Counted before image expansion (a processor adds the image tokens), so this is a lower
        bound: it bounds the work of a runaway text, it does not promise that images still fit.
        """
        if self.max_tokens is not None and num_tokens > self.max_tokens:
            raise DataError(
                f"{sample.source}: sample {sample.id!r} has {num_tokens} tokens, more than the model's "
                f"context of {self.max_tokens} (max_position_embeddings)",
                hint="shorten the sample's question or answer, or leave the sample out",
            )

    def check_bos(self, token_ids: list[int], sample: Sample) -> None:
        if self.bos_token_id is not None and token_ids[:2] == [self.bos_token_id] * 2:
            raise ModelError(f"{sample.source}: sample {sample.id!r} would start with two BOS tokens")

    def _render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):
            raise ModelError("the chat template did not render to a string")
        return text


def profiled_positions(mode: str, *, length: int, answer_start: int, answer_length: int) -> range:
    """Positions of one unpadded sequence that are profiled in ``mode`` (DESIGN §1).

    ``answer``: the positions whose next-token prediction is an answer token — the last prompt
    position and answer tokens 1..n-1. ``answer-tokens``: the answer tokens 1..n themselves.
    ``all``: every position of the sequence.
    """
    if mode == "answer":
        return range(answer_start - 1, answer_start + answer_length - 1)
    if mode == "answer-tokens":
        return range(answer_start, answer_start + answer_length)
    if mode == "all":
        return range(0, length)
    raise ValueError(f"unknown positions mode {mode!r}")
