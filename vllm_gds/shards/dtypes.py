"""Names of tensor dtypes: torch's, the manifest's and safetensors' header codes."""

import torch

# manifest name -> (torch dtype, safetensors header code)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
_BY_TORCH = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_BY_SAFETENSORS = {code: name for name, (_, code) in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"tensors of dtype {dtype} cannot be stored in vllm-gds shards") from None


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name][0]


def safetensors_code(name: str) -> str:
    return _DTYPES[name][1]


def name_from_safetensors_code(code: str) -> str:
    return _BY_SAFETENSORS[code]


def is_known(name: str) -> bool:
    return name in _DTYPES
