"""Checks on request tensors at every edge (Python API, HTTP, router). Errors name the problem."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from expertray.errors import InputError, OversizeError

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_hidden(hidden: object, d_model: int, max_tokens: int | None = None) -> torch.Tensor:
    """Validate hidden states [T, D] (or [..., D], flattened) and return them as a [T, D] tensor."""
    if isinstance(hidden, np.ndarray):
        if hidden.dtype.kind != "f":
            raise InputError(f"hidden states must be floating point, got numpy dtype {hidden.dtype}")
        hidden = tensor_view(np.ascontiguousarray(hidden))
    if not isinstance(hidden, torch.Tensor):
        raise InputError(f"hidden states must be a torch.Tensor or numpy array, got {type(hidden).__name__}")
    if hidden.dtype not in ACCEPTED_DTYPES:
        raise InputError(f"hidden states dtype {hidden.dtype} not supported (use one of "
                         f"{', '.join(str(d) for d in ACCEPTED_DTYPES)})")
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


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a numpy array that may be read-only (Ray object-store buffers are).

    Callers only read it; torch warns about read-only buffers regardless, so that warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
