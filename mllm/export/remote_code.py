"""The flat remote-code files written beside an mllm export (loaded with `trust_remote_code=True`).

transformers imports remote code from the checkpoint folder as flat sibling files and refuses files that
import packages the user lacks, so nothing here may import `mllm`, open_clip or triton. The two
entry files (`mllm/export/remote/`) are written for the export; everything they compute with is mllm's
own source, copied at export time with its `mllm.*` imports rewritten to sibling-relative ones, so the
exported model runs the code that trained it (one source, no hand-kept twin):

    mllm/attention/layout.py        -> mma_layout.py
    mllm/schema.py                  -> mllm_schema.py
    mllm/sparse/<name>.py           -> sparse_<name>.py
    mllm/compression/__init__.py    -> compression.py
    mllm/compression/<name>.py      -> compression_<name>.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ENTRY_FILES = ("configuration_mllm_llava.py", "modeling_mllm_llava.py")
SPARSE_MODULES = ("config", "routing", "experts", "moe", "mot", "attention_experts", "upcycle", "mod", "moh", "depth")
COMPRESSION_MODULES = ("config", "base", "pooling", "tome", "vmtc", "pruning")
MODEL_TYPE = "mllm_llava"
ARCHITECTURE = "MLLMLlavaForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_mllm_llava.MLLMLlavaConfig",
    "AutoModelForImageTextToText": "modeling_mllm_llava.MLLMLlavaForConditionalGeneration",
}
# The only top-level packages remote files may import (besides the standard library): transformers
# installs huggingface_hub and pyyaml itself.
ALLOWED_PACKAGES = {"torch", "transformers", "huggingface_hub", "yaml"}

_IMPORT = re.compile(r"^(\s*)from\s+mllm\.((?:sparse|compression)(?:\.\w+)?|schema|attention\.layout)\s+import\s",
                     re.M)
_ANY_MLLM_IMPORT = re.compile(r"^\s*(?:from|import)\s+mllm\b.*$", re.M)


def _exported_modules() -> dict[str, str]:
    """mllm module (dotted, without `mllm.`) -> the flat file name (without .py) it is exported as."""
    modules = {"attention.layout": "mma_layout", "schema": "mllm_schema", "compression": "compression"}
    modules.update({f"sparse.{m}": f"sparse_{m}" for m in SPARSE_MODULES})
    modules.update({f"compression.{m}": f"compression_{m}" for m in COMPRESSION_MODULES})
    return modules


def _sources() -> dict[str, Path]:
    """Exported file name -> the mllm source file it is copied from."""
    root = Path(__file__).resolve().parents[1]  # the mllm package
    sources = {name: root / "export" / "remote" / name for name in ENTRY_FILES}
    for module, name in _exported_modules().items():
        path = root.joinpath(*module.split("."))
        sources[f"{name}.py"] = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return sources


def _relative(match: re.Match) -> str:
    indent, target = match.group(1), match.group(2)
    name = _exported_modules().get(target)
    if name is None:
        raise RuntimeError(f"mllm.{target} is imported by exported code but not exported; add it to SPARSE_MODULES "
                           "or COMPRESSION_MODULES in mllm/export/remote_code.py")
    return f"{indent}from .{name} import "


def flatten_imports(source: str, where: str) -> str:
    """`from mllm.sparse.moe import X` -> `from .sparse_moe import X`; any other mllm import is an error."""
    text = _IMPORT.sub(_relative, source)
    left = _ANY_MLLM_IMPORT.search(text)
    if left is not None:
        raise RuntimeError(f"{where}: {left.group(0).strip()!r} cannot be flattened into remote code; exported "
                           "files may import only torch, transformers and each other")
    return text


def imported_packages(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source` (relative imports excluded)."""
    names = re.findall(r"^\s*(?:from\s+(\w+)[\w.]*\s+import|import\s+(\w+))", source, re.M)
    return {a or b for a, b in names}


def write_remote_code(folder: Path, *, mma_mode: str | None = None, mma_assistant_token_id: int | None = None,
                      moe: dict | None = None, mod: dict | None = None, moh: dict | None = None,
                      compression: dict | None = None, token_pruning: dict | None = None) -> None:
    """Copy the remote-code files into a saved Llava folder and point config.json's Auto classes at them."""
    import sys

    folder = Path(folder)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, source in _sources().items():
        text = flatten_imports(source.read_text(), str(source))
        foreign = imported_packages(text) - ALLOWED_PACKAGES - stdlib
        if foreign:
            raise RuntimeError(f"{source} imports {sorted(foreign)}; exported remote code may import only "
                               f"{sorted(ALLOWED_PACKAGES)} and the standard library")
        (folder / name).write_text(text)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=AUTO_MAP, mma_mode=mma_mode,
                  mma_assistant_token_id=mma_assistant_token_id, moe=moe, mod=mod, moh=moh, compression=compression,
                  token_pruning=token_pruning)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def has_remote_code(folder) -> bool:
    """True for exports that need `trust_remote_code=True`."""
    return (Path(folder) / "modeling_mllm_llava.py").is_file()
