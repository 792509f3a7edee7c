"""The weight dtypes an encoder may run in, by name.

bfloat16 roughly halves encode time on CPUs with AVX512-BF16 (measured: README "Speed"), at a cosine of >= 0.998
to float32 embeddings; embeddings always come out float32.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("float32", "bfloat16", "float16") or itself; a clear error otherwise."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"Unsupported dtype {value!r}: use one of {', '.join(DTYPES)}.")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def weights_dtype(model: torch.nn.Module) -> str:
    """The name of the dtype most of a model's weights are in (an SPT encoder: its backbone's)."""
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    if not sizes:
        return "float32"
    dtype = max(sizes, key=sizes.__getitem__)
    return dtype_name(dtype) if dtype in DTYPES.values() else str(dtype).removeprefix("torch.")
