"""The hub model card (README.md) of an exported checkpoint: YAML metadata, usage, metrics.

The front matter is what the hub indexes: `library_name` picks the "Use in Transformers" snippet,
`pipeline_tag` the task (and the inference widget), `base_model` the model tree.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import yaml

TAGS = ["mllm", "llava", "vision-language"]

USAGE = '''\
```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{model_id}")
processor = AutoProcessor.from_pretrained("{model_id}")

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.png")], text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
'''


def model_card_metadata(base_model: str | list[str] | None = None) -> dict:
    metadata: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
    if base_model:
        metadata["base_model"] = base_model
    metadata["tags"] = list(TAGS)
    return metadata


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    return f"{value:.4g}"


def metrics_table(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {name} | {_format_value(value)} |" for name, value in metrics.items()]
    return "\n".join(rows) + "\n"


def write_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | list[str] | None = None,
    description: str,
    metrics: dict | None = None,
    model_id: str | None = None,
) -> Path:
    """Write `folder/README.md`; `model_id` is the name used in the usage snippet (default: folder name)."""
    folder = Path(folder)
    model_id = model_id or folder.name
    front_matter = yaml.safe_dump(model_card_metadata(base_model), sort_keys=False)
    usage = USAGE.format(model_id=model_id)
    sections = [f"---\n{front_matter}---\n", f"# {model_id}\n", description.strip() + "\n", "## Usage\n", usage]
    if metrics:
        sections += ["## Metrics\n", metrics_table(metrics)]
    path = folder / "README.md"
    path.write_text("\n".join(sections))
    return path


__all__ = ["model_card_metadata", "metrics_table", "write_model_card"]
