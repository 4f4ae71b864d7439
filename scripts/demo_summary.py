"""The demo's last step: reload the export with plain transformers, answer a held-out question, and
print the summary table (accuracy per question type vs chance, tokens/s, wall time, paths)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def ask(export_dir: Path, image: Image.Image, question: str) -> str:
    """Transformers only: what a user of the exported folder would write."""
    # trust_remote_code: an MMA-trained export carries its attention as flat remote-code files
    # (torch + transformers only); a causal export is plain Llava and needs none.
    remote = (export_dir / "modeling_mllm_llava.py").is_file()
    model = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=torch.float32,
                                                        trust_remote_code=remote).eval()
    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=remote)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=end)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def training_throughput(run: Path) -> dict[str, tuple[float, str]]:
    """Mean logged throughput per stage, with its unit (a contrastive stage counts images)."""
    import yaml

    objectives = {s["name"]: s["objective"] for s in yaml.safe_load((run / "config.yaml").read_text())["stages"]}
    rates: dict[str, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "tokens_per_s" in record:
            rates.setdefault(record["stage"], []).append(record["tokens_per_s"])
    return {stage: (sum(v) / len(v), "images/s" if objectives.get(stage) == "contrastive" else "tokens/s")
            for stage, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--started", type=float, required=True, help="unix time the demo started")
    args = parser.parse_args()
    run, data = Path(args.run), Path(args.data)

    heldout = json.loads((data / "llava" / "heldout_vqa.json").read_text())[0]
    image = Image.open(data / "llava" / heldout["image"]).convert("RGB")
    question = heldout["conversations"][0]["value"].replace("<image>", "").strip()
    reference = heldout["conversations"][1]["value"]
    answer = ask(run / "export", image, question)

    report = json.loads((run / "eval.json").read_text())
    rates = training_throughput(run)
    rows = [("question type", "n", "accuracy", "chance")]
    rows += [(t, str(r["n"]), f"{r['accuracy']:.3f}", f"{r['chance']:.3f}") for t, r in report["per_type"].items()]
    rows.append(("overall", str(report["n"]), f"{report['accuracy']:.3f}", f"{report['chance']:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print("\n=== mllm demo summary ===")
    for row in rows:
        print("  ".join(cell.ljust(width[i]) if i == 0 else cell.rjust(width[i]) for i, cell in enumerate(row)))
    print()
    for stage, (rate, unit) in rates.items():
        print(f"train {unit} ({stage}): {rate:,.0f}")
    print(f"eval generated tokens/s: {report['generated_tokens_per_s']:,.0f}")
    print(f"wall time: {(time.time() - args.started) / 60:.1f} min")
    print(f"sample (held-out image {heldout['image']}): Q: {question!r} -> {answer!r} (reference {reference!r})")
    print(f"run folder: {run}")
    print(f"loss plot:  {run / 'loss.png'}")
    print(f"export:     {run / 'export'}")


if __name__ == "__main__":
    main()
