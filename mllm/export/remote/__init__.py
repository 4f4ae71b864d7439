"""Remote-code files copied next to exported checkpoints that need more than plain Llava.

They import only torch and transformers (transformers rejects remote code importing packages the
user may lack) plus their siblings; `mma_layout.py` is `mllm/attention/layout.py`, copied verbatim.
Nothing in mllm imports these modules: they run from an exported folder.
"""
