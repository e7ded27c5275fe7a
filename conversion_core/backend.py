"""Choose between a plugin's Triton kernels and its torch path.

``CONVERSION_CORE_BACKEND``: ``auto`` (default: Triton for CUDA tensors when Triton imports,
torch otherwise), ``torch`` (always the torch path), ``triton`` (always Triton; on CPU tensors
this needs ``TRITON_INTERPRET=1``, which is how CI proves the kernels without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .errors import ConfigError

BACKEND_ENV = "CONVERSION_CORE_BACKEND"
BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go through the Triton kernels."""
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ConfigError(f"{BACKEND_ENV}=triton but triton is not installed: pip install triton")
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"{BACKEND_ENV}=triton on a {tensor.device.type} tensor needs TRITON_INTERPRET=1")
        return True
    return tensor.device.type == "cuda" and triton_available()
