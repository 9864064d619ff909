"""expertray: elastic expert-parallel runtime for Mixture-of-Experts inference on Ray."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["from_pretrained"]


def __getattr__(name: str) -> Any:  # lazy: `import expertray` stays free of torch/transformers
    if name == "from_pretrained":
        from expertray.checkpoint.model import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'expertray' has no attribute {name!r}")
