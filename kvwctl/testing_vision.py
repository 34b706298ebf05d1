"""Tiny vision-language checkpoints for ``kvwctl.testing_families``: real processors, small images.

Every builder returns a real transformers model (two decoder layers, hidden size 32, one or two
vision layers) and its real processor, built offline: the tokenizer is trained on the spot
(``kvwctl.testing_families.trained_tokenizer``), images are 28 pixels (2x2 patches of 14) unless
the family needs more, and the chat template writes the family's own image placeholder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvwctl.testing_families import (
    CHATML,
    GEMMA,
    _template,
    _text,
    chatml_tokenizer,
    gemma_tokenizer,
    trained_tokenizer,
)

IMAGE = 28  # pixels: 2x2 patches of 14


def _siglip(**extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=14,
    )
    fields.update(extra)
    return fields


def build_qwen3_vl() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = chatml_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = _text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=24,
        num_heads=2,
        out_hidden_size=32,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    pixels = 64 * 64  # 4x4 patches of 16, merged 2x2: 4 image tokens
    processor = tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(patch_size=16, min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        video_processor=tf.Qwen3VLVideoProcessor(),
        chat_template=CHATML,
    )
    return model, processor


def build_gemma3() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = gemma_tokenizer()
    config = tf.Gemma3Config(
        text_config=_text(tokenizer, sliding_window=16),
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    image_processor = tf.Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    processor = tf.Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA, image_seq_length=4)
    return model, processor


def _chatml_with(image: str) -> str:
    return _template(
        start="",
        turn=lambda role: f"<|im_start|>{role}\n",
        end="<|im_end|>\n",
        generation="<|im_start|>assistant\n",
        image=image,
    )


def build_idefics3(model_type: str = "idefics3") -> tuple[Any, Any]:
    """Idefics3 / SmolVLM: ``User:<image>…<end_of_utterance>``; one image token per image here
    (2x2 patches, pixel-shuffled by 2), no image splitting."""
    import transformers as tf

    smolvlm = model_type == "smolvlm"
    template = _template(
        start="" if smolvlm else "{{ bos_token }}",
        turn=lambda role: f"{'<|im_start|>' if smolvlm else ''}{role.capitalize()}:",
        end="<end_of_utterance>\n",
        generation=("<|im_start|>" if smolvlm else "") + "Assistant:",
        image="<image>",
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<end_of_utterance>", "<image>"]
    specials += ["<fake_token_around_image>", "<global-img>", "<video>"]
    tokenizer = trained_tokenizer(
        specials,
        byte_level=True,
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|end_of_text|>",
        adds_bos=not smolvlm,
    )
    tokenizer.chat_template = template
    image_size = {"longest_edge": IMAGE}
    processor: Any
    config_class: Any
    vision_class: Any
    if smolvlm:
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(
                do_image_splitting=False, size=image_size, max_image_size=image_size
            ),
            tokenizer=tokenizer,
            video_processor=tf.SmolVLMVideoProcessor(),
            image_seq_len=1,
            chat_template=template,
        )
        config_class, vision_class = tf.SmolVLMConfig, tf.SmolVLMVisionConfig
    else:
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(
                do_image_splitting=False, size=image_size, max_image_size=image_size
            ),
            tokenizer=tokenizer,
            image_seq_len=1,
            chat_template=template,
        )
        config_class, vision_class = tf.Idefics3Config, tf.Idefics3VisionConfig
    tokenizer = processor.tokenizer  # the processor adds its row/column tokens
    config = config_class(
        vision_config=vision_class(**_siglip()),
        text_config=dict(model_type="llama", **_text(tokenizer)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return getattr(tf, "SmolVLMForConditionalGeneration" if smolvlm else "Idefics3ForConditionalGeneration")(
        config
    ), processor


def build_smolvlm() -> tuple[Any, Any]:
    return build_idefics3("smolvlm")


MISTRAL_IMAGE_TEMPLATE = _template(
    start="{{ bos_token }}",
    turn=lambda role: "[INST] " if role == "user" else " ",
    end="{% if role == 'user' %} [/INST]{% else %}</s>{% endif %}",
    generation="",
    image="<image>\n",
)


def build_llava_next() -> tuple[Any, Any]:
    """LLaVA-NeXT (Mistral): anyres with one 28x28 grid point, CLIP with its CLS token."""
    import transformers as tf

    from kvwctl.testing import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    tokenizer.chat_template = MISTRAL_IMAGE_TEMPLATE
    grid = [[IMAGE, IMAGE]]
    vision = tf.CLIPVisionConfig(**_siglip(projection_dim=16))
    config = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=dict(model_type="mistral", **_text(tokenizer, sliding_window=None)),
        image_grid_pinpoints=grid,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    processor = tf.LlavaNextProcessor(
        image_processor=tf.LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=grid
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_IMAGE_TEMPLATE,
    )
    return tf.LlavaNextForConditionalGeneration(config), processor


def build_llava_onevision() -> tuple[Any, Any]:
    """LLaVA-OneVision (Qwen2): ChatML with ``<image>``, SigLIP without CLS ("full" features)."""
    import transformers as tf

    template = _chatml_with("<image>\n")
    tokenizer = chatml_tokenizer({"image_token": "<image>", "video_token": "<video>"}, template)
    grid = [[IMAGE, IMAGE]]
    config = tf.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **_siglip()),
        text_config=dict(model_type="qwen2", **_text(tokenizer)),
        image_grid_pinpoints=grid,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(
            size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=grid
        ),
        tokenizer=tokenizer,
        video_processor=tf.LlavaOnevisionVideoProcessor(),
        num_image_tokens=4,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


def build_internvl() -> tuple[Any, Any]:
    """InternVL-hf (Qwen2): ``<IMG_CONTEXT>`` placeholders, 2x2 patches pixel-shuffled to one token."""
    import transformers as tf

    template = _chatml_with("<IMG_CONTEXT>\n")
    tokenizer = chatml_tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        template,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[IMAGE, IMAGE],
        patch_size=[14, 14],
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=dict(model_type="qwen2", **_text(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=1,
        downsample_ratio=0.5,
    )
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(size={"height": IMAGE, "width": IMAGE}, crop_to_patches=False),
        tokenizer=tokenizer,
        video_processor=tf.InternVLVideoProcessor(),
        image_seq_length=1,
        chat_template=template,
    )
    return tf.InternVLForConditionalGeneration(config), processor


def build_mllama() -> tuple[Any, Any]:
    """Mllama: layer 1 of 2 is a cross-attention layer (its MLP is a decoder MLP like layer 0's)."""
    import transformers as tf

    template = _template(
        start="{{ bos_token }}",
        turn=lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n",
        end="<|eot_id|>",
        generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
        image="<|image|>",
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    specials += ["<|image|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
    tokenizer = trained_tokenizer(
        specials,
        byte_level=True,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        adds_bos=True,
    )
    tokenizer.chat_template = template
    vision = tf.MllamaVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        vision_output_dim=32,
        image_size=IMAGE,
        patch_size=14,
        max_num_tiles=1,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    text = _text(tokenizer, cross_attention_layers=[1])
    text.pop("head_dim")
    config = tf.MllamaConfig(
        vision_config=vision,
        text_config=tf.MllamaTextConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    processor = tf.MllamaProcessor(
        tf.MllamaImageProcessor(size={"height": IMAGE, "width": IMAGE}, max_image_tiles=1),
        tokenizer,
        chat_template=template,
    )
    return tf.MllamaForConditionalGeneration(config), processor


def build_mistral3() -> tuple[Any, Any]:
    """Mistral 3: Pixtral vision, ``[IMG]`` placeholders expanded with ``[IMG_BREAK]`` and ``[IMG_END]``."""
    import transformers as tf

    template = _template(
        start="{{ bos_token }}",
        turn=lambda role: "[INST]" if role == "user" else "",
        end="{% if role == 'user' %}[/INST]{% else %}</s>{% endif %}",
        generation="",
        image="[IMG]",
    )
    tokenizer = trained_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
        byte_level=True,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        adds_bos=True,
    )
    tokenizer.chat_template = template
    size = 2 * IMAGE  # 4x4 patches merged 2x2: 4 tokens (transformers 5.24 cannot split a single one)
    vision = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=size,
        patch_size=14,
    )
    config = tf.Mistral3Config(
        vision_config=dict(model_type="pixtral", **vision),
        text_config=dict(model_type="mistral", **_text(tokenizer, sliding_window=None)),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    processor = tf.PixtralProcessor(
        image_processor=tf.PixtralImageProcessor(size={"longest_edge": size}, patch_size=14),
        tokenizer=tokenizer,
        patch_size=14,
        spatial_merge_size=2,
        chat_template=template,
    )
    return tf.Mistral3ForConditionalGeneration(config), processor


def build_paligemma() -> tuple[Any, Any]:
    """PaliGemma 2 (Gemma 2 text, SigLIP): no chat template; the processor adds ``<bos>``, ``"\\n"``
    and 1152 ``<locNNNN>``/``<segNNN>`` tokens; 4 image tokens (``image_seq_length``)."""
    import transformers as tf

    tokenizer = trained_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        byte_level=False,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        adds_bos=True,  # Gemma's tokenizer adds <bos>; the processor turns that off and writes it itself
        extra={"image_token": "<image>"},
    )
    tokenizer.add_tokens(["\n"])  # Gemma's vocabulary has "\n", which the processor ends every prompt with
    image_processor = tf.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_seq_length=4)
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    config = tf.PaliGemmaConfig(
        vision_config=_siglip(),
        text_config=dict(model_type="gemma2", **_text(tokenizer, sliding_window=16)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        projection_dim=32,
        hidden_size=32,
        tie_word_embeddings=False,
    )
    return tf.PaliGemmaForConditionalGeneration(config), processor


VISION_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen3_vl": build_qwen3_vl,
    "gemma3": build_gemma3,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "internvl": build_internvl,
    "mllama": build_mllama,
    "mistral3": build_mistral3,
    "paligemma": build_paligemma,
}
