"""The `export` section: what `sfumato export` writes besides the diffusers folder (ONNX, INT8)."""

from __future__ import annotations

from pydantic import Field

from sfumato.config.base import Frozen
from sfumato.config.diffusion import Sampler


class ExportConfig(Frozen):
    """`sfumato export RUN_DIR`: diffusers folder, ONNX and INT8 of the EMA weights."""

    sampler: Sampler = "ddim"
    """The scheduler the diffusers folder ships with (users may swap it, the diffusers way)."""
    onnx: bool = True
    int8: bool = True
    """Also an INT8 copy (onnxruntime dynamic quantisation of the weights)."""
    onnx_opset: int = Field(18, ge=14, le=23)
    check_batch_size: int = Field(2, ge=1, le=64)
    """Batch of fixed inputs on which ONNX is compared with PyTorch."""
