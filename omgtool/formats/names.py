"""File names omgtool writes or looks for, in one place."""

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
README = "README.md"
BASE_README = "README.base.md"  # a base model's own README.md, carried under this name
PROJECTOR_FILE = "projector.safetensors"  # non-LLM components (projectors) beside a model
EXTRAS_FILE = "extras.safetensors"  # tensors no mapping explains, carried under their names
UNCONVERTED_FILE = "unconverted.safetensors"  # tensors no conversion rule covers
MERGE_RECORD = "omgtool-merge.json"
EXPORT_RECORD = "omgtool-export.json"
ADAPTER_CONFIG = "adapter_config.json"
