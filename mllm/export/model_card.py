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

model = AutoModelForImageTextToText.from_pretrained("{model_id}"{remote})
processor = AutoProcessor.from_pretrained("{model_id}"{remote})

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.png")], text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
'''


# The hub's model-tree relations (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def model_card_metadata(base_model: str | list[str] | None = None, base_model_relation: str | None = None,
                        datasets: list[str] | None = None, license: str | None = None) -> dict:
    metadata: dict = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
    if license:
        metadata["license"] = license
    if base_model:
        metadata["base_model"] = base_model
        if base_model_relation is not None:
            if base_model_relation not in BASE_MODEL_RELATIONS:
                raise ValueError(f"base_model_relation {base_model_relation!r}; valid: {', '.join(BASE_MODEL_RELATIONS)}")
            metadata["base_model_relation"] = base_model_relation
    if datasets:
        metadata["datasets"] = list(datasets)
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
    base_model_relation: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    description: str,
    metrics: dict | None = None,
    recipe: str | None = None,
    model_id: str | None = None,
    remote_code: bool = False,
) -> Path:
    """Write `folder/README.md`; `model_id` is the name used in the usage snippet (default: folder name).
    `recipe`: the training recipe (YAML text) shown in the card; `metrics`: flat name -> value."""
    folder = Path(folder)
    model_id = model_id or folder.name
    metadata = model_card_metadata(base_model, base_model_relation, datasets, license)
    front_matter = yaml.safe_dump(metadata, sort_keys=False)
    usage = USAGE.format(model_id=model_id, remote=", trust_remote_code=True" if remote_code else "")
    sections = [f"---\n{front_matter}---\n", f"# {model_id}\n", description.strip() + "\n", "## Usage\n", usage]
    if metrics:
        sections += ["## Evaluation\n", metrics_table(metrics)]
    if recipe:
        sections += ["## Training recipe\n", f"```yaml\n{recipe.strip()}\n```\n"]
    path = folder / "README.md"
    path.write_text("\n".join(sections))
    return path


__all__ = ["model_card_metadata", "metrics_table", "write_model_card"]
