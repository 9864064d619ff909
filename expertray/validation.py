"""Checks on requests at every edge (Python API, HTTP, router, CLI). Errors name the problem.

`check_layer` is the one rule for layer indices; `check_hidden` the one rule for hidden-state tensors.
"""

from __future__ import annotations

import operator
import warnings

import numpy as np
import torch

from expertray.errors import InputError, OversizeError, UnknownExpertError

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# numpy float types with a torch twin; longdouble (float128) and float96 have none
ACCEPTED_NUMPY_DTYPES = (np.float16, np.float32, np.float64)


def check_layer(layer: object, num_layers: int) -> int:
    """A layer index as a Python int in [0, num_layers).

    Accepts Python ints, numpy integers and 0-d integer arrays/tensors; refuses bool (True is not layer 1),
    floats, strings and anything else with UnknownExpertError naming the value.
    """
    index = _as_index(layer)
    if index is None or not 0 <= index < num_layers:
        why = " (a layer index must be an integer, not bool)" if _is_bool(layer) else ""
        raise UnknownExpertError(f"unknown layer {layer!r}{why} (cluster serves layers 0..{num_layers - 1})")
    return index


def _is_bool(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return True
    return isinstance(value, torch.Tensor | np.ndarray) and value.dtype in (torch.bool, np.bool_)


def _as_index(value: object) -> int | None:
    if _is_bool(value):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.is_meta:
            return None
        return int(value.item())
    if isinstance(value, np.ndarray):
        return int(value) if value.ndim == 0 and value.dtype.kind in "iu" else None
    if isinstance(value, int | np.integer):
        return operator.index(value)
    return None


def check_hidden(hidden: object, d_model: int, max_tokens: int | None = None) -> torch.Tensor:
    """Validate hidden states [..., D] and return them flattened to a [T, D] tensor (T = product of the
    leading dims). Callers that answer in the request's shape reshape the [T, D] output back."""
    if isinstance(hidden, np.ndarray):
        hidden = _numpy_to_tensor(hidden)
    if not isinstance(hidden, torch.Tensor):
        raise InputError(f"hidden states must be a torch.Tensor or numpy array, got {type(hidden).__name__}")
    _check_storage(hidden)
    if hidden.dim() < 2:
        raise InputError(f"hidden states must have shape [tokens, d_model={d_model}], got {tuple(hidden.shape)}")
    if hidden.shape[-1] != d_model:
        raise InputError(f"hidden states last dim must be d_model={d_model}, got shape {tuple(hidden.shape)}")
    flat = hidden.reshape(-1, d_model)
    if flat.shape[0] == 0:
        raise InputError("empty batch: hidden states have 0 tokens")
    if max_tokens is not None and flat.shape[0] > max_tokens:
        raise OversizeError(f"request has {flat.shape[0]} tokens, over the limit of {max_tokens}")
    # amax propagates NaN and is ~8x cheaper than isfinite().all() on large batches
    if not bool(torch.isfinite(flat.abs().amax())):
        bad = int((~torch.isfinite(flat)).any(dim=1).nonzero()[0, 0])
        raise InputError(f"hidden states contain NaN or inf (first at token {bad})")
    return flat


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind != "f":
        raise InputError(f"hidden states must be floating point, got numpy dtype {array.dtype}")
    if array.dtype.type not in ACCEPTED_NUMPY_DTYPES:
        raise InputError(f"hidden states numpy dtype {array.dtype} not supported (use float16, float32 or float64)")
    if not array.dtype.isnative:
        raise InputError(f"hidden states have non-native byte order (numpy dtype {array.dtype.str}); convert with "
                         f"array.astype(array.dtype.newbyteorder('='))")
    return tensor_view(np.ascontiguousarray(array))


def _check_storage(hidden: torch.Tensor) -> None:
    """Refuse tensors whose values cannot be read as a dense float array: sparse, meta, quantized, complex."""
    if hidden.layout != torch.strided:
        raise InputError(f"hidden states must be a dense tensor, got layout {hidden.layout} (call .to_dense())")
    if hidden.is_meta:
        raise InputError("hidden states are a meta tensor (shape only, no data)")
    if hidden.is_quantized:
        raise InputError(f"hidden states are a quantized tensor ({hidden.dtype}); dequantize() them first")
    if hidden.dtype not in ACCEPTED_DTYPES:
        raise InputError(f"hidden states dtype {hidden.dtype} not supported (use one of "
                         f"{', '.join(str(d) for d in ACCEPTED_DTYPES)})")


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a numpy array that may be read-only (Ray object-store buffers are).

    Callers only read it; torch warns about read-only buffers regardless, so that warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
