"""Dtype names. Canonical names are the safetensors ones (F32, BF16, ...)."""

from __future__ import annotations

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "C64": 8, "C128": 16,
}

# torch.<Name>Storage as it appears in pickles -> canonical dtype (torch keeps the
# same table in torch/storage.py and imports nothing to use it).
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL", "ComplexFloatStorage": "C64", "ComplexDoubleStorage": "C128",
    "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2",
    "UInt16Storage": "U16", "UInt32Storage": "U32", "UInt64Storage": "U64",
    "UntypedStorage": "U8",
}

# torch dtype attribute names (torch.float16 ...) -> canonical
TORCH_DTYPE_NAMES = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32",
    "float16": "F16", "half": "F16", "bfloat16": "BF16", "int64": "I64", "long": "I64",
    "int32": "I32", "int": "I32", "int16": "I16", "short": "I16", "int8": "I8",
    "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "complex64": "C64", "complex128": "C128",
}

# user-facing spellings for --dtype options
USER_DTYPES = {"fp32": "F32", "float32": "F32", "f32": "F32", "fp16": "F16", "float16": "F16",
               "f16": "F16", "half": "F16", "bf16": "BF16", "bfloat16": "BF16"}

# canonical -> (numpy dtype string, numpy values per element): how to decode raw bytes without
# torch (complex: (re, im) pairs); BF16 and float8 have no numpy dtype
NUMPY_LAYOUT = {"F64": ("<f8", 1), "F32": ("<f4", 1), "F16": ("<f2", 1), "I64": ("<i8", 1),
                "I32": ("<i4", 1), "I16": ("<i2", 1), "I8": ("i1", 1), "U64": ("<u8", 1), "U32": ("<u4", 1),
                "U16": ("<u2", 1), "U8": ("u1", 1), "BOOL": ("?", 1), "C64": ("<f4", 2), "C128": ("<f8", 2)}

HF_CONFIG_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def torch_dtype(name: str):
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64, "C128": torch.complex128,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }
    return table[name]


def from_torch(dtype) -> str:
    return TORCH_DTYPE_NAMES[str(dtype).removeprefix("torch.")]


def parse_user_dtype(text: str) -> str:
    key = text.strip().lower()
    if key in USER_DTYPES:
        return USER_DTYPES[key]
    if text.upper() in ("F32", "F16", "BF16"):
        return text.upper()
    from omgtool.errors import InvalidArgument

    raise InvalidArgument(f"unknown dtype {text!r}; use bf16, fp16 or fp32")
