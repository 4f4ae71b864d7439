"""mllm: vision encoder + projector + any transformers causal LM, trained in staged recipes.

The model library (this package) never imports deepspeed, webdataset or training code; those live
in `mllm.train` and `mllm.data`.
"""

from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor

# `AutoModelForImageTextToText` / `AutoProcessor` open our run folders once mllm is imported.
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

AutoModelForImageTextToText.register(MLLMConfig, MLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MLLMConfig, MLLMProcessor, exist_ok=True)

__all__ = ["MLLMConfig", "MLLMForConditionalGeneration", "MLLMProcessor", "OpenCLIPVisionConfig"]
__version__ = "0.1.0"
