"""Data pipelines (installed as `mllm.data`): from files on disk to the micro-batches of a training step.

- `sources`: LLaVA JSON and webdataset readers -> `Record`s (one or several images, one meta schema)
- `shards`: tar shard listing (globs, braces, `pipe:` URLs), member indexing, reads on access
- `loader`: the deterministic, resumable mixture stream and per-rank loader, DataLoader workers
- `batching`: a window of samples -> fixed, length-grouped or packed micro-batches
- `packing`: rows of whole samples (`pack_bins`) and their collation with document ids
- `convert`: `mllm data convert`, LLaVA JSON + images -> shards with a manifest
- `synth`: the synthetic shapes world for tests and the demo
"""
