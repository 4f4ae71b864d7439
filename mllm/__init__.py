"""mllm."""
