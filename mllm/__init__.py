"""mllm: vision encoder + projector + any transformers causal LM, trained in staged recipes.

The model library (this package) never imports deepspeed, webdataset or training code; those live
in `mllm.train` and `mllm.data`.
"""

from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor

__all__ = ["MLLMConfig", "MLLMForConditionalGeneration", "MLLMProcessor", "OpenCLIPVisionConfig"]
__version__ = "0.1.0"
