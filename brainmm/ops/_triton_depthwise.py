"""Triton kernels for stride-1 'same' depthwise 3D convolution (NCDHW, odd cubic kernels).

Imported only when the Triton backend is chosen. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (the tests
use it). Sums are accumulated in float32 whatever the tensor dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(tile, H, W, D, BLOCK: tl.constexpr):
    """BLOCK consecutive voxels of a (H, W, D) plane: flat offsets, in-plane flags and their (h, w, d)."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < H * W * D, offs // (W * D), (offs // D) % W, offs % D


@triton.jit
def _shifted(plane, h, w, d, inside, kh, kw, kd: tl.constexpr, H, W, D, K: tl.constexpr):
    """The plane's values at each voxel shifted by tap (kh, kw, kd) of a centred K^3 kernel (0 outside), float32."""
    hh = h + (kh - K // 2)
    ww = w + (kw - K // 2)
    dd = d + (kd - K // 2)
    ok = inside & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & (dd >= 0) & (dd < D)
    return tl.load(plane + (hh * W + ww) * D + dd, mask=ok, other=0.0).to(tl.float32)


# Both kernels loop at run time over the kernel's rows (kh, kw) and unroll along the contiguous axis (kd): unrolling
# all K^3 taps keeps K^3 address/mask sets live and spilled registers for K = 5 (255 registers, 460 B).
@triton.jit(do_not_specialize=["C", "H", "W", "D"])
def _depthwise_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, D,
                              K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # one program: one (sample, channel) plane and BLOCK consecutive output voxels of it
    nc = tl.program_id(0)
    c = nc % C
    offs, inside, h, w, d = _tile(tl.program_id(1), H, W, D, BLOCK)
    base = nc.to(tl.int64) * (H * W * D)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kh in range(K):
        for kw in range(K):
            taps = w_ptr + c * (K * K * K) + (kh * K + kw) * K
            for kd in tl.static_range(K):
                xv = _shifted(x_ptr + base, h, w, d, inside, kh, kw, kd, H, W, D, K)
                acc += xv * tl.load(taps + kd).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["H", "W", "D", "TILES"])
def _depthwise_weight_grad_kernel(x_ptr, g_ptr, partial_ptr, H, W, D, TILES,
                                  K: tl.constexpr, BLOCK: tl.constexpr):
    # one program: the K^3 tap sums of one (sample, channel) plane over BLOCK output voxels, written as partials
    nc = tl.program_id(0)
    tile = tl.program_id(1)
    offs, inside, h, w, d = _tile(tile, H, W, D, BLOCK)
    base = nc.to(tl.int64) * (H * W * D)
    g = tl.load(g_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
    out = partial_ptr + (nc.to(tl.int64) * TILES + tile) * (K * K * K)
    for kh in range(K):
        for kw in range(K):
            for kd in tl.static_range(K):
                xv = _shifted(x_ptr + base, h, w, d, inside, kh, kw, kd, H, W, D, K)
                tl.store(out + (kh * K + kw) * K + kd, tl.sum(xv * g, axis=0))


FORWARD_BLOCK = 512  # 4 warps: at most 64 registers, no spills (ptxas -v, sm_90a)
WEIGHT_GRAD_BLOCK = 1024  # 4 warps: at most 115 registers, no spills (ptxas -v, sm_90a)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (N, C, H, W, D)``, ``weight (C, 1, K, K, K)``, ``bias (C,)`` -> ``(N, C, H, W, D)``, padding K // 2."""
    n, c, h, w, d = x.shape
    k = weight.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (n * c, triton.cdiv(h * w * d, FORWARD_BLOCK))
    _depthwise_forward_kernel[grid](x, weight, bias if bias is not None else weight, out, c, h, w, d,
                                    K=k, HAS_BIAS=bias is not None, BLOCK=FORWARD_BLOCK)
    return out


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """d loss / d weight ``(C, 1, K, K, K)`` in float32, from ``x`` and ``grad_out`` (both ``(N, C, H, W, D)``)."""
    n, c, h, w, d = x.shape
    k = kernel_size
    tiles = triton.cdiv(h * w * d, WEIGHT_GRAD_BLOCK)
    partial = torch.empty(n * c, tiles, k ** 3, device=x.device, dtype=torch.float32)
    _depthwise_weight_grad_kernel[(n * c, tiles)](x, grad_out, partial, h, w, d, tiles, K=k,
                                                  BLOCK=WEIGHT_GRAD_BLOCK)
    return partial.view(n, c, tiles, k ** 3).sum(dim=(0, 2)).view(c, 1, k, k, k)
