"""Rendering for models without a chat template whose processor takes the answer as a suffix (PaliGemma).

PaliGemma has no chat template. Its processor (transformers' ``PaliGemmaProcessor``) takes the
prompt as ``text`` and, for training, the answer as ``suffix=``, and rewrites both:

    "<image>" * k + question     ->  <image> * (k * image_seq_length)  <bos>  question  "\\n"
    suffix=answer                ->  answer <eos>        (tokenized as the second sequence of a pair)

and returns ``token_type_ids`` (0 for the image-and-prompt prefix, 1 for the suffix). The model
attends bidirectionally inside the prefix and causally in the suffix, so the answer must go in as
``suffix=``: put in the text, it would sit in the bidirectional prefix and every prompt position
would see it. ``PrefixSuffixRenderer`` therefore renders

* for teacher forcing (profile, scoring): ``text`` = one ``<image>`` per image, then the question
  verbatim (PaliGemma's task prefixes, e.g. ``answer en``, belong in the question if the checkpoint
  was trained with them), and ``suffix`` = the answer;
* for generation: the same ``text`` without a suffix; the model continues after the ``"\\n"``.

Its answer tokens are located by tokenizing the sequence the processor builds (with one
``<image>`` per image, since expansion only adds image tokens before the answer) as a pair;
``encode_batch`` then checks the processor's own ids and ``token_type_ids``
(``check_suffix_segment``): the suffix must be exactly the answer tokens and ``<eos>``, at the end
of the sequence. Every sample needs an image: the processor refuses text-only input.
"""

from __future__ import annotations

from typing import Any

from kvwctl.conversation import ChatRenderer, RenderedPrompt, RenderedSample
from kvwctl.data import Sample
from kvwctl.errors import DataError, ModelError


class PrefixSuffixRenderer(ChatRenderer):
    """Renders a sample as PaliGemma's processor expects it: prompt as ``text``, answer as ``suffix=``."""

    uses_chat_template = False

    def __init__(self, processor: Any, *, max_tokens: int | None = None, image_required: str | None = None) -> None:
        super().__init__(processor, multimodal=True, max_tokens=max_tokens, image_required=image_required)
        image_token = getattr(processor, "image_token", None)
        self.eos_token_id = self.tokenizer.eos_token_id
        if not isinstance(image_token, str) or self.bos_token is None or self.eos_token_id is None:
            raise ModelError(
                "the model's processor names no image token, or its tokenizer no BOS/EOS token; "
                "kvwctl renders a prompt/suffix pair with them"
            )
        self.image_token: str = image_token

    def prompt_text(self, sample: Sample) -> str:
        """The processor's ``text``: one image placeholder per image, then the question verbatim."""
        if not sample.images:
            reason = self.image_required or "the model's processor refuses a sample without an image"
            raise DataError(f"{sample.source}: image: sample {sample.id!r} has none; {reason}")
        if self.image_token in sample.question or self.image_token in sample.answer:
            raise DataError(
                f"{sample.source}: sample {sample.id!r} contains the image placeholder {self.image_token!r}",
                hint="images are given by the sample's image field, not written in its text",
            )
        return self.image_token * len(sample.images) + sample.question

    def render_prompt(self, sample: Sample) -> RenderedPrompt:
        """The prefix alone, for generation (the processor adds ``<bos>`` and ``"\\n"``)."""
        text = self.prompt_text(sample)
        self.check_length(len(self._pair(text, None)[0]), sample)
        return RenderedPrompt(sample=sample, text=text, add_special_tokens=True)

    def render(self, sample: Sample) -> RenderedSample:
        text = self.prompt_text(sample)
        if not sample.answer:
            raise DataError(f"{sample.source}: sample {sample.id!r} has an empty answer")
        token_ids, segments = self._pair(text, sample.answer)
        answer_start = segments.index(1) if 1 in segments else len(segments)
        suffix = token_ids[answer_start:]
        if answer_start < 1 or segments[answer_start:] != [1] * len(suffix) or suffix[-1:] != [self.eos_token_id]:
            raise ModelError(f"{sample.source}: cannot map the answer of sample {sample.id!r} to suffix tokens")
        self.check_length(len(token_ids), sample)
        return RenderedSample(
            sample=sample,
            text=text,
            add_special_tokens=True,
            token_ids=tuple(token_ids),
            answer_start=answer_start,
            answer_length=len(suffix) - 1,  # the answer's tokens; the <eos> after them is not part of it
            suffix=sample.answer,
        )

    def _pair(self, text: str, suffix: str | None) -> tuple[list[int], list[int]]:
        """The token ids (and token type ids) the processor produces, images unexpanded.

        The rewrite is transformers 5.24's ``PaliGemmaProcessor.prepare_inputs_layout``: ``<bos>``
        after the last image placeholder, ``"\\n"`` after the prompt, ``<eos>`` after the suffix. If
        a later version rewrites differently, ``encode_batch`` finds the processor's ids differ and
        refuses the batch.
        """
        end = text.rfind(self.image_token) + len(self.image_token)
        prefix = text[:end] + self.bos_token + text[end:] + "\n"
        pair = None if suffix is None else suffix + self.tokenizer.eos_token
        encoding = self.tokenizer(prefix, text_pair=pair, return_token_type_ids=True)
        return list(encoding["input_ids"]), list(encoding["token_type_ids"])


def check_suffix_segment(
    token_type_ids: Any, row: int, *, answer_start: int, length: int, item: RenderedSample
) -> None:
    """The processor's ``token_type_ids`` (batch, sequence) of one row: 0 up to the answer, 1 to its end."""
    expected = [0] * answer_start + [1] * (length - answer_start)
    if token_type_ids is None or token_type_ids[row, :length].tolist() != expected:
        raise ModelError(
            f"{item.sample.source}: cannot locate the answer of sample {item.sample.id!r}: the processor's "
            "token_type_ids do not mark exactly the answer and <eos> as the suffix"
        )
