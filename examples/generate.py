"""Load a checkpoint with transformers and answer one question (greedy), to check it still works.

python examples/generate.py kvw-run/unlearned "Who is this person?" --image data/images/p0.png
"""

from __future__ import annotations

import argparse

import torch
import transformers
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("question")
    parser.add_argument("--image")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    arguments = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(arguments.checkpoint)
    multimodal = hasattr(config, "vision_config")
    if multimodal:
        processor = transformers.AutoProcessor.from_pretrained(arguments.checkpoint)
        model = transformers.AutoModelForImageTextToText.from_pretrained(arguments.checkpoint)
        content = ([{"type": "image"}] if arguments.image else []) + [{"type": "text", "text": arguments.question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = [Image.open(arguments.image).convert("RGB")] if arguments.image else None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        tokenizer = processor.tokenizer
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(arguments.checkpoint)
        model = transformers.AutoModelForCausalLM.from_pretrained(arguments.checkpoint)
        messages = [{"role": "user", "content": arguments.question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = tokenizer.bos_token
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)))
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=arguments.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
