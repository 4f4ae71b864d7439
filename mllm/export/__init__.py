"""mllm/export."""
