"""Attention layouts (one key interval per query) and their transformers integration."""

from mllm.attention.layout import MODES, AttentionLayout, compute_layout, dense_mask

__all__ = ["MODES", "AttentionLayout", "compute_layout", "dense_mask"]
