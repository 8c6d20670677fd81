"""Depthwise 3D convolution with a choice of backend (UniFormer's 3^3 position and 5^3 "attention" convolutions).

PyTorch runs a 5-D depthwise convolution on the GPU with its own direct kernels (cuDNN only for channels-last
inputs), whose weight gradient is reduced separately per channel and kernel position (presumed to dominate the
official step; ``brainmm bench ops`` measures it). The ``triton`` backend keeps the same function and parameters
(a drop-in ``nn.Conv3d``) and reduces all K^3 taps' weight gradients from one pass per tile.

Backends: ``torch`` (``F.conv3d``, the default), ``triton`` (CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``, as the tests run it). Choose with ``BRAINMM_DEPTHWISE=torch|triton``,
``with depthwise_backend("triton"): ...``, or the run configs' ``depthwise`` setting. ``DepthwiseConv3d`` is
stride 1 with 'same' padding and an odd kernel by construction; inputs of 2**31 or more elements use ``torch``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("torch", "triton")
_state = {"backend": None}  # None: read BRAINMM_DEPTHWISE on first use


def get_depthwise_backend() -> str:
    if _state["backend"] is None:
        name = os.environ.get("BRAINMM_DEPTHWISE", "torch").strip().lower() or "torch"
        _state["backend"] = _check(name, "BRAINMM_DEPTHWISE")
    return _state["backend"]


def set_depthwise_backend(name: str) -> None:
    """Choose the depthwise-convolution backend for every ``DepthwiseConv3d`` in the process."""
    _state["backend"] = _check(name, "backend")


@contextlib.contextmanager
def depthwise_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block only."""
    previous = get_depthwise_backend()
    set_depthwise_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def _check(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}={name!r} is not a depthwise-convolution backend; use one of {', '.join(BACKENDS)}.")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError(f"{what}='triton' needs the triton package (pip install triton): {err}") from err
    return name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------- Triton custom ops
@torch.library.custom_op("brainmm::depthwise_conv3d", mutates_args=())
def _triton_depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from . import _triton_depthwise

    return _triton_depthwise.forward(x.contiguous(), weight.contiguous(), bias)


@_triton_depthwise_conv3d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("brainmm::depthwise_conv3d_weight_grad", mutates_args=())
def _triton_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    from . import _triton_depthwise

    return _triton_depthwise.weight_grad(x.contiguous(), grad_out.contiguous(), kernel_size)


@_triton_weight_grad.register_fake
def _(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[1], 1, kernel_size, kernel_size, kernel_size), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN202
    x, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # the transpose of a stride-1 'same' convolution is the same convolution with the kernel flipped
        grad_x = _triton_depthwise_conv3d(grad_out, weight.flip((2, 3, 4)), None)
    if ctx.needs_input_grad[1]:
        grad_w = _triton_weight_grad(x, grad_out, weight.shape[-1]).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(grad_out.dtype)
    return grad_x, grad_w, grad_b


_triton_depthwise_conv3d.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- module
class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)`` (same parameters and state-dict keys) whose forward
    runs on the chosen backend: ``(B, C, H, W, D) -> (B, C, H, W, D)``."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"DepthwiseConv3d needs an odd kernel_size for 'same' padding, got {kernel_size}.")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if get_depthwise_backend() == "triton" and (x.is_cuda or _interpreting()) and x.numel() < 2**31:
            weight, bias = self.weight, self.bias
            if torch.is_autocast_enabled(x.device.type):  # autocast does not reach custom ops: cast as conv3d would
                dtype = torch.get_autocast_dtype(x.device.type)
                x, weight = x.to(dtype), weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            return _triton_depthwise_conv3d(x, weight, bias)
        return F.conv3d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)
