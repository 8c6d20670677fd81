"""Operators with a choice of backend (see ``brainmm.ops.depthwise``)."""

from .depthwise import (
    BACKENDS,
    DepthwiseConv3d,
    depthwise_backend,
    get_depthwise_backend,
    set_depthwise_backend,
)

__all__ = ["BACKENDS", "DepthwiseConv3d", "depthwise_backend", "get_depthwise_backend", "set_depthwise_backend"]
