"""The Triton depthwise-convolution backend equals F.conv3d (values and gradients), run by Triton's CPU interpreter.

The kernels are compiled for the interpreter only when TRITON_INTERPRET=1 is set before Triton JIT-decorates them, so
the checks run in a fresh interpreter process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from brainmm.ops import DepthwiseConv3d, depthwise_backend, get_depthwise_backend, set_depthwise_backend

pytest.importorskip("triton")

CHECKS = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from brainmm.ops import DepthwiseConv3d, depthwise_backend
    from brainmm.models.uniformer import ConvBlock

    def grads(module, x, g, backend):
        x = x.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        with depthwise_backend(backend):
            y = module(x)
        y.backward(g)
        return [y.detach(), x.grad] + [p.grad for p in module.parameters()]

    def close(a, b, tol):
        scale = b.abs().max().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= tol * scale, (a.float() - b.float()).abs().max() / scale

    torch.manual_seed(0)
    # odd kernel sizes, odd/uneven grids, with and without bias
    for k, shape, bias in ((3, (2, 3, 5, 6, 7), True), (5, (1, 2, 6, 4, 9), True), (5, (2, 2, 3, 5, 4), False),
                           (1, (1, 2, 3, 3, 3), True)):
        conv = DepthwiseConv3d(shape[1], k, bias=bias)
        x, g = torch.randn(shape), torch.randn(shape)
        for a, b in zip(grads(conv, x, g, "triton"), grads(conv, x, g, "torch")):
            close(a, b, 1e-5)
    # channels-last input gives the same result
    conv = DepthwiseConv3d(4, 3)
    x = torch.randn(1, 4, 4, 5, 6)
    close(grads(conv, x.to(memory_format=torch.channels_last_3d), torch.ones_like(x), "triton")[0],
          grads(conv, x, torch.ones_like(x), "torch")[0], 1e-5)
    # a whole UniFormer convolution block (3^3 position + 5^3 aggregation convolutions), forward and every gradient
    block = ConvBlock(4)
    x, g = torch.randn(1, 4, 5, 4, 6), torch.randn(1, 4, 5, 4, 6)
    for a, b in zip(grads(block, x, g, "triton"), grads(block, x, g, "torch")):
        close(a, b, 1e-5)
    # bf16 autocast: both backends compute in bf16 with float32 sums
    conv = DepthwiseConv3d(3, 5)
    x, g = torch.randn(1, 3, 6, 6, 6), torch.randn(1, 3, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grads(conv, x, g, "triton")
        ref = grads(conv, x, g, "torch")
    assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    for a, b in zip(out, ref):
        close(a, b, 2e-2)
    # under torch.compile (one graph: the custom ops' fake shapes and autograd registration hold)
    conv = DepthwiseConv3d(3, 5)
    x = torch.randn(1, 3, 4, 5, 6)

    def compiled_grads(backend, compile):
        xg = x.clone().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        fn = lambda t: (conv(t).sin() * 2).sum()  # noqa: E731
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True) if compile else fn
        with depthwise_backend(backend):
            fn(xg).backward()
        return [xg.grad, conv.weight.grad, conv.bias.grad]

    for a, b in zip(compiled_grads("triton", True), compiled_grads("torch", False)):
        close(a, b, 1e-5)
    # the check `brainmm bench ops` reports for the Triton rows on a GPU
    from brainmm.bench import _relative_error
    x = torch.randn(1, 3, 4, 5, 6, requires_grad=True)
    assert _relative_error(conv, x, torch.randn(1, 3, 4, 5, 6), "triton") < 1e-5
    print("depthwise triton checks passed")
""")


def test_triton_backend_matches_conv3d_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "BRAINMM_DEPTHWISE": "torch"}
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "depthwise triton checks passed" in done.stdout


def test_backend_choice_and_errors(monkeypatch):
    assert get_depthwise_backend() in ("torch", "triton")
    before = get_depthwise_backend()
    with depthwise_backend("torch"):
        assert get_depthwise_backend() == "torch"
    assert get_depthwise_backend() == before
    with pytest.raises(ValueError, match="'cudnn' is not a depthwise-convolution backend; use one of torch, triton"):
        set_depthwise_backend("cudnn")
    with pytest.raises(ValueError, match="odd kernel_size"):
        DepthwiseConv3d(4, 4)


def test_triton_backend_falls_back_to_conv3d_for_cpu_tensors():
    # outside the interpreter the Triton kernels need CUDA tensors: CPU tensors take F.conv3d, same numbers
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs Triton's interpreter")
    conv = DepthwiseConv3d(2, 3)
    x = torch.randn(1, 2, 4, 4, 4)
    with depthwise_backend("triton"):
        out = conv(x)
    assert torch.equal(out, torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1, groups=2))


def test_state_dict_keys_are_those_of_conv3d():
    conv = DepthwiseConv3d(4, 5)
    ref = torch.nn.Conv3d(4, 4, 5, padding=2, groups=4)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    assert conv.weight.shape == ref.weight.shape


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_hopper_without_register_spills(dtype, tmp_path):
    # ahead-of-time compilation for sm_90 needs no GPU: catches kernels that do not build, or that spill registers
    # (the fully unrolled 5^3 loop once did: 255 registers and 460 bytes of spills)
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # older Triton: no arch argument
            ptxas = get_ptxas().path
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no ptxas in this Triton install: {err}")
    from brainmm.ops import _triton_depthwise as kernels

    def spills(fn, signature: dict, constexprs: dict) -> tuple[int, int]:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        ptx = tmp_path / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return (int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1)),
                int(re.search(r"Used (\d+) registers", done.stderr).group(1)))

    ints = {"H": "i32", "W": "i32", "D": "i32"}
    for k in (3, 5):
        fwd = spills(kernels._depthwise_forward_kernel,
                     {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                      "C": "i32", **ints, "K": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
                     {"K": k, "HAS_BIAS": True, "BLOCK": kernels.FORWARD_BLOCK})
        grad = spills(kernels._depthwise_weight_grad_kernel,
                      {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "partial_ptr": "*fp32", **ints, "TILES": "i32",
                       "K": "constexpr", "BLOCK": "constexpr"},
                      {"K": k, "BLOCK": kernels.WEIGHT_GRAD_BLOCK})
        assert fwd[0] == 0 and grad[0] == 0, (k, fwd, grad)
