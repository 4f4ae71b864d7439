"""Sparse and dynamic compute in the decoder: modality-aware Mixture-of-Experts (MoMa / MoE-LLaVA),
Mixture-of-Transformers (per-modality attention projections and norms), and upcycling from a
dense checkpoint. Everything here is off by default; off means the dense model, bit for bit.
"""

from mllm.sparse.config import MoESpec, UpcycleSpec
from mllm.sparse.moe import MoEBlock, apply_moe, moe_blocks
from mllm.sparse.routing import RoutingContext, set_routing_context
from mllm.sparse.upcycle import upcycle

__all__ = ["MoEBlock", "MoESpec", "RoutingContext", "UpcycleSpec", "apply_moe", "moe_blocks",
           "set_routing_context", "upcycle"]
