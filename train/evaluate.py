"""Held-out evaluation: exact-match accuracy per question type with batched greedy generation.

Every question of a multi-turn sample is asked with the conversation so far (earlier turns carry
their reference answers) and the images of its `<image>` placeholders so far, in order (a record may
hold several), left-padded into batches and decoded greedily with the KV cache. Images are preprocessed
by the model folder's processor, i.e. with the `image_aspect` (resize / pad / anyres) it was trained with.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch

from mllm.builder import set_generation_defaults
from mllm.data.sources import decode_images, open_source
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor, count_images, llava_to_messages
from mllm.sparse.config import MoESpec
from mllm.sparse.moe import load_summary, moe_blocks, routing_counts


def load_for_inference(folder: str):
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    model = MLLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = MLLMProcessor.from_pretrained(folder)
    set_generation_defaults(model, processor.tokenizer)
    return model, processor


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def generate_batch(model, processor: MLLMProcessor, prompts: list[str], images: list, max_new_tokens: int,
                   use_cache: bool = True) -> list[str]:
    """Greedy answers to `prompts`; `images`: one per `<image>` placeholder, in order across the prompts."""
    inputs = processor(images=images, text=prompts, padding_side="left")
    inputs.pop("modality_ids")
    # Stop tokens (<|end|>, EOS) and padding come from the model's generation config (builder.py).
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def answer(model, processor: MLLMProcessor, images: list, questions: list[str], max_new_tokens: int = 16) -> list[str]:
    """One question per image, single turn."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    return [a.strip() for a in generate_batch(model, processor, prompts, images, max_new_tokens)]


def vqa_items(source, max_samples: int, processor: MLLMProcessor):
    """(prompt, images, reference, question_type, question) for every question of the first samples;
    `images` are those of the prompt's placeholders (a record's images in placeholder order, up to the
    ones its conversation has shown so far)."""
    for i in range(min(max_samples, len(source))):
        record = source[i]
        if record.meta.get("kind") != "vqa":
            continue
        images = decode_images(record)
        messages = llava_to_messages(record.meta["conversations"])
        if count_images(messages) != len(images):
            raise ValueError(f"eval record {record.key!r}: {count_images(messages)} <image> placeholder(s) but "
                             f"{len(images)} image(s); each image needs exactly one <image>, in order")
        types = record.meta.get("question_types") or ["unknown"] * (len(messages) // 2)
        for turn in range(0, len(messages) - 1, 2):
            context = messages[: turn + 1]
            prompt = processor.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            reference = messages[turn + 1]["content"][0]["text"]
            question = " ".join(c["text"] for c in messages[turn]["content"] if c["type"] == "text")
            yield prompt, images[: count_images(context)], reference, types[turn // 2], question


def evaluate(model, processor: MLLMProcessor, data: str, max_samples: int = 500, batch_size: int = 32,
             max_new_tokens: int = 8) -> dict:
    source = open_source({"type": "llava_json" if data.endswith(".json") else "webdataset", "path": data})
    items = list(vqa_items(source, max_samples, processor))
    if not items:
        raise ValueError(f"no VQA questions found in {data}")
    correct, total = defaultdict(int), defaultdict(int)
    answers_by_type: dict[str, set] = defaultdict(set)
    examples = []
    started, generated = time.perf_counter(), 0
    model.eval()
    routing_counts(model)  # MoE models: count expert load from zero
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outputs = generate_batch(model, processor, [c[0] for c in chunk], [image for c in chunk for image in c[1]],
                                 max_new_tokens)
        for (_, _, reference, qtype, question), output in zip(chunk, outputs):
            hit = normalize(output) == normalize(reference)
            correct[qtype] += hit
            total[qtype] += 1
            answers_by_type[qtype].add(normalize(reference))
            generated += len(processor.tokenizer(output, add_special_tokens=False)["input_ids"]) + 1
            if len(examples) < 5:
                examples.append({"question": question, "reference": reference, "output": output})
    elapsed = time.perf_counter() - started
    per_type = {t: {"accuracy": correct[t] / total[t], "n": total[t],
                    # Chance: a uniform guess among this type's answers in the evaluated data.
                    "chance": 1 / len(answers_by_type[t])} for t in sorted(total)}
    n = sum(total.values())
    report = {"accuracy": sum(correct.values()) / n, "n": n,
              "chance": sum(per_type[t]["chance"] * total[t] for t in total) / n,
              "per_type": per_type, "examples": examples,
              "seconds": elapsed, "generated_tokens_per_s": generated / elapsed}
    from mllm.sparse.depth import dynamic_stats, dynamic_summary

    dynamic = dynamic_stats(model)
    if dynamic is not None:  # MoD kept fraction / gates and MoH head usage over the questions
        report.update(dynamic_summary(model, dynamic))
    from mllm.compression.pruning import pruning_stats, pruning_summary

    pruning = pruning_stats(model)
    if pruning is not None:  # image tokens left per layer over the questions (prompt prefills)
        report["pruning"] = pruning_summary(model, pruning)
    counts = routing_counts(model)
    if counts is not None:  # the questions' expert load (prompt and generated tokens), per layer and modality
        report["moe"] = load_summary(counts, MoESpec.from_config(model.config.moe),
                                     [name for name, _ in moe_blocks(model)])
    return report


def write_expert_load_plot(report: dict, path: Path) -> Path | None:
    """`expert_load.png` for an MoE model's report (a heatmap per modality); None for dense models."""
    if "moe" not in report:
        return None
    from mllm.train.metrics import plot_expert_load

    return plot_expert_load(report["moe"], path, "held-out expert load")


def write_dynamic_plot(report: dict, path: Path) -> Path | None:
    """`dynamic_compute.png` for MoD / MoH / token-pruning models (kept fraction per layer, head usage); None
    otherwise."""
    if not {"mod", "moh", "pruning"} & set(report):
        return None
    from mllm.train.metrics import plot_dynamic_compute

    return plot_dynamic_compute(report.get("mod"), report.get("moh"), path, report.get("pruning"))


def write_eval_plots(report: dict, folder: Path) -> list[Path]:
    """The plots an eval report supports, next to it: expert_load.png (MoE), dynamic_compute.png (MoD/MoH)."""
    plots = [write_expert_load_plot(report, Path(folder) / "expert_load.png"),
             write_dynamic_plot(report, Path(folder) / "dynamic_compute.png")]
    return [p for p in plots if p is not None]


def format_report(report: dict) -> str:
    lines = [f"{'type':<10} {'n':>6} {'accuracy':>9} {'chance':>7}"]
    for qtype, row in report["per_type"].items():
        lines.append(f"{qtype:<10} {row['n']:>6} {row['accuracy']:>9.3f} {row['chance']:>7.3f}")
    lines.append(f"{'overall':<10} {report['n']:>6} {report['accuracy']:>9.3f} {report['chance']:>7.3f}")
    return "\n".join(lines)
