"""Relaunching a compiled Triton kernel with less host time than ``kernel[grid](...)``.

A decode step runs `TreeAttention.run` once per layer, eagerly unless the caller captures a CUDA
graph, so its host time adds up. Triton's ``JITFunction.run`` binds every argument, renders its
specialization key as a string and looks the compiled kernel up on every call: measured on an
H100 (torch 2.11, triton 3.6, `scripts/host_overhead.py`), 36 to 41 us of host time for the
partials kernel (30 arguments) and 21 to 27 us for the merge, 12 us for an empty kernel.
`Launcher` does that work once per specialization: it keys the compiled kernel on what Triton
specializes on (each tensor's dtype, device and 16-byte alignment; each integer's equality to 1,
divisibility by 16 and width; the constexpr values and launch options) and then calls the
compiled kernel directly, through the public ``CompiledKernel[grid](*args)`` runner (the same
call ``JITFunction.run`` ends with, in triton 3.6 and 3.9 alike). Under the interpreter (no
compiled kernels) it simply calls ``kernel[grid](...)``. Measured the same way with it: 26 to 28
us and 16 to 17 us; about half of that is this key (14 us for the partials kernel's 32
arguments on a 2-core CPU). Reusing the key parts of arguments passed again would halve it but
means holding the previous call's tensors (a whole KV cache) alive; not done.
"""

from __future__ import annotations

import inspect

import torch

_OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")
"""Launch options a call may pass besides the kernel's parameters. Each is a compile option of
the CUDA backend, carried by the compiled kernel (``launch_pdl``: launch as a programmatic
dependent launch, `deft.kernels.reduction.merge`), so it is part of the key."""


class Launcher:
    """Launches one ``@triton.jit`` kernel: ``launcher(grid, *args, **kwargs)`` is
    ``kernel[grid](*args, **kwargs)``, with the compiled kernel reused by specialization."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.interpreted = not hasattr(kernel, "params")  # TRITON_INTERPRET=1: no compiling
        params = inspect.signature(kernel.fn).parameters
        self.names = tuple(params)
        self.defaults = {n: p.default for n, p in params.items()
                         if p.default is not inspect.Parameter.empty}
        self.constexpr = set() if self.interpreted else {
            p.name for p in kernel.params if p.is_constexpr}
        self.compiled = {}

    def __call__(self, grid, *args, **kwargs):
        if self.interpreted:
            self.kernel[grid](*args, **kwargs)
            return
        values = list(args)
        for name in self.names[len(args):]:
            values.append(kwargs[name] if name in kwargs else self.defaults[name])
        key = self.specialization(values, kwargs)
        compiled = self.compiled.get(key)
        if compiled is None:  # first launch of this specialization: Triton binds and compiles
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None:
                self.compiled[key] = compiled
        else:  # the compiled runner takes a 3-D grid (JITFunction.run pads it the same way)
            compiled[(tuple(grid) + (1, 1))[:3]](*values)

    def specialization(self, values, kwargs) -> tuple:
        """What the compiled kernel depends on, for one call's arguments in parameter order."""
        key = []
        for name, value in zip(self.names, values):
            if name in self.constexpr:
                key.append(value)
            elif isinstance(value, torch.Tensor):
                key.append((value.dtype, value.get_device(), value.data_ptr() % 16 == 0))
            elif isinstance(value, bool) or not isinstance(value, int):
                key.append(type(value))
            else:
                key.append((value == 1, value % 16 == 0, -2**31 <= value < 2**31))
        key.extend(kwargs.get(option) for option in _OPTIONS)
        return tuple(key)
