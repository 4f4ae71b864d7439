"""End-to-end training-step benchmark: the stock stack vs ours, same model, same batches, same process.

baseline: transformers' own layers and SDPA attention, full-logits cross-entropy.
ours:     our fused RMSNorm / SwiGLU / RoPE kernels and the chunked fused lm_head + cross-entropy, plus
          (on CUDA) the interval-attention Triton kernel with the MMA layout. `--ours` picks the parts.
Each runs `--steps` optimizer steps (AdamW, bf16 on CUDA / fp32 on CPU) after `--warmup` steps on
identical random batches: LLaVA-style samples of `image tokens + --text-tokens` tokens. Printed per
stack: tokens/s, model TFLOP/s per device and MFU (FLOPs from the architecture, mllm.train.flops),
peak memory, the mean loss (the stacks must agree), and the ratios ours / baseline.

Configurations:
  tiny  (CPU default)  the demo's size: 4-layer 256-wide Llama, 48px ViT with 9 image tokens
  cpu576               the same LLM behind a 1-layer tower with 576 image tokens (48 px, patch 2), 2 x (576 + 64)
  1b    (CUDA default) ~1.1B Llama (2048 wide, 22 layers, GQA 32/4, 5632 FFN, 32k vocab) + a ViT-L/14-336
                       tower (24 layers, 1024 wide, 576 image tokens), 4 samples x (576 + 256) tokens

  python scripts/bench_train.py                     # CUDA: the 1b configuration
  nice .venv/bin/python scripts/bench_train.py      # CPU: tiny
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from mllm.configuration import MLLMConfig
from mllm.fused import apply_fused_kernels
from mllm.modeling import MLLMForConditionalGeneration, causal_lm_loss_sum
from mllm.train.flops import batch_flops, current_device_name, mfu

CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                             image_size=48, patch_size=16),
                 text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512),
                 batch=32, text_tokens=40),
    # Images dominate: 576 image tokens per sample on a tiny LLM (what MoD / compression act on; bench_mod).
    "cpu576": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                               image_size=48, patch_size=2),
                   text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512),
                   batch=2, text_tokens=64),
    "1b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14),
               text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000),
               batch=4, text_tokens=256),
}
IMAGE_TOKEN = 4


def build(name: str, attention: dict | None) -> MLLMForConditionalGeneration:
    spec = CONFIGS[name]
    config = MLLMConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                        text_config=LlamaConfig(**spec["text"], max_position_embeddings=4096),
                        image_token_id=IMAGE_TOKEN, attention=attention)
    torch.manual_seed(0)
    return MLLMForConditionalGeneration(config)


def batches(model, name: str, n: int, device, seed: int = 0) -> list[dict]:
    spec, config = CONFIGS[name], model.config
    g = torch.Generator().manual_seed(seed)
    image = [IMAGE_TOKEN] * config.num_image_tokens
    out = []
    for _ in range(n):
        rows = [[9] + image + torch.randint(10, config.vocab_size, (spec["text_tokens"],), generator=g).tolist()
                for _ in range(spec["batch"])]
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, : 1 + len(image) + spec["text_tokens"] // 3] = -100  # the "question" part is not a target
        size = config.vision_config.image_size
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device), "modality_ids": (ids == IMAGE_TOKEN).long().to(device),
                    "pixel_values": torch.randn(spec["batch"], 3, size, size, generator=g).to(device)})
    return out


def run(model, data: list[dict], warmup: int, fused_loss: bool, dtype, device) -> dict:
    model = model.to(device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cuda = device.type == "cuda"
    times, loss_values = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(data):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if fused_loss:
            total = model(**inputs, labels=labels, fused_loss=True, use_cache=False).loss_sum
        else:
            total, _ = causal_lm_loss_sum(model(**inputs, use_cache=False).logits, labels)
        loss = total / (labels[:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            loss_values.append(float(loss.detach()))
    tokens = int(data[0]["attention_mask"].sum())
    flops = batch_flops(model.config, input_ids=data[0]["input_ids"].cpu(),
                        attention_mask=data[0]["attention_mask"].cpu()).training
    step_s = statistics.median(times)
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "tflops": flops / step_s / 1e12,
            "loss": statistics.mean(loss_values),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="1b" if cuda else "tiny")
    parser.add_argument("--steps", type=int, default=20 if cuda else 10)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2)
    parser.add_argument("--ours", default="rms_norm,swiglu,rope,fused_ce" + (",interval_attention" if cuda else ""),
                        help="comma list of: rms_norm, swiglu, rope, fused_ce, interval_attention")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: GPU table)")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = set(args.ours.split(","))
    attention = {"mode": "mma", "backend": "auto", "assistant_token_id": 8} if "interval_attention" in parts else None

    baseline_model = build(args.config, None)
    ours_model = build(args.config, attention)
    ours_model.load_state_dict(baseline_model.state_dict())
    ops = tuple(op for op in ("rms_norm", "swiglu", "rope") if op in parts)
    if ops:
        apply_fused_kernels(ours_model, ops)
    data = batches(baseline_model, args.config, args.steps + args.warmup, device)
    results = {"baseline": run(baseline_model, data, args.warmup, False, dtype, device)}
    del baseline_model
    results["ours"] = run(ours_model, data, args.warmup, "fused_ce" in parts, dtype, device)
    device_name = current_device_name() or platform.processor() or "cpu"
    print(f"{device_name}, {dtype}, config {args.config}: {args.steps} steps after {args.warmup} warmup; ours = {args.ours}")
    print(f"{'stack':<10} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} {'mean loss':>10}")
    for name, r in results.items():
        m = mfu(r["tflops"] * 1e12, current_device_name(), args.peak_tflops)
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
        print(f"{name:<10} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} {r['tflops']:>9.3f} "
              f"{(f'{m:.1%}' if m is not None else 'n/a'):>7} {mem:>9} {r['loss']:>10.4f}")
    b, o = results["baseline"], results["ours"]
    print(f"ours / baseline: tokens/s x{o['tokens_per_s'] / b['tokens_per_s']:.2f}"
          + (f", peak memory x{o['peak_mem_gb'] / b['peak_mem_gb']:.2f}" if b["peak_mem_gb"] else "")
          + f", mean loss difference {abs(o['loss'] - b['loss']):.2e}")


if __name__ == "__main__":
    main()
