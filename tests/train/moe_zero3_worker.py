"""Worker for the ZeRO-3 routing-skew test (run by torch.distributed.run with 2 processes).

Rank 0 feeds a degenerate batch (one text token repeated), so at the first MoE layer every text token
has the same hidden state and picks the same expert: the other text expert gets no tokens on rank 0,
while rank 1's varied batch reaches it. Both ranks must finish their steps under ZeRO-3.
Writes `<out>/rank<r>.json` with the per-layer expert load and the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.sparse.moe import moe_blocks, routing_counts
from mllm.train.distributed import init_distributed, shutdown
from mllm.train.engine import build_engine

STEPS = 3


def main(out: Path, zero_config: str, implementation: str) -> None:
    info = init_distributed(timeout_s=120)  # a hang becomes an error after 2 minutes
    torch.manual_seed(0)
    vision = OpenCLIPVisionConfig(model_name="mllm-zero3-vit", model_cfg={
        "embed_dim": 16, "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}})
    text = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    moe = {"experts": {"text": 2, "image": 2}, "top_k": 1, "implementation": implementation}
    model = MLLMForConditionalGeneration(MLLMConfig(vision_config=vision, text_config=text, image_token_id=4, moe=moe))
    stage = SimpleNamespace(micro_batch_size=2, grad_accum=1, max_grad_norm=1.0, deepspeed=None, betas=[0.9, 0.999])
    cfg = SimpleNamespace(run=SimpleNamespace(deepspeed=zero_config, dtype="fp32"))
    groups = [{"params": [p for p in model.parameters()], "lr": 1e-3, "weight_decay": 0.0}]
    engine = build_engine(model, groups, stage, cfg, info, lambda step: 1.0)
    image = [4] * model.config.num_image_tokens
    generator = torch.Generator().manual_seed(info.rank)
    if info.rank == 0:
        rows = [image + [20] * 12, image + [20] * 12]
    else:
        rows = [image + torch.randint(9, 64, (12,), generator=generator).tolist() for _ in range(2)]
    input_ids = torch.tensor(rows)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "pixel_values": torch.randn(2, 3, 48, 48, generator=generator)}
    labels = input_ids.masked_fill(input_ids == 4, -100)
    losses, loads = [], []
    leaves = [name for name, block in moe_blocks(engine.module) if getattr(block, "_z3_leaf", False)]
    for _ in range(STEPS):
        result = engine(**batch, labels=labels)
        engine.backward(result.loss)
        engine.step()
        losses.append(float(result.loss.detach()))
        loads.append(routing_counts(engine.module)["load"].tolist())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps({"losses": losses, "load": loads, "leaves": leaves}))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
