"""`deft.kernels.launch.Launcher`: one Triton bind per specialization, the compiled kernel after.

The GPU path is exercised here with a stand-in for a compiled ``@triton.jit`` kernel (the
interpreter has no compiled kernels); `tests/test_kernels.py` runs the real kernels through it.
"""

import inspect

import torch


from deft.kernels.launch import Launcher  # noqa: E402


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class FakeJit:
    """Records JIT launches (``kernel[grid](...)``) and compiled-kernel launches."""

    def __init__(self):
        def fn(x_ptr, n, scale, BLOCK, FLAG=False):
            pass

        self.fn = fn
        self.params = [_Param(name, name.isupper()) for name in inspect.signature(fn).parameters]
        self.jit_calls, self.compiled_calls = [], []

    def __getitem__(self, grid):
        def jit_launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            fake = self

            class Compiled:
                def __getitem__(self, grid):  # triton's runner reads grid[0], [1] and [2]
                    return lambda *values: fake.compiled_calls.append(
                        ((grid[0], grid[1], grid[2]), values))

            return Compiled()

        return jit_launch


def test_binds_once_per_specialization_then_reuses_the_compiled_kernel():
    kernel = FakeJit()
    launch = Launcher(kernel)
    x = torch.zeros(64)
    launch((4,), x, 32, 0.5, BLOCK=16, num_warps=4)
    launch((8,), x, 48, 0.25, BLOCK=16, num_warps=4)  # same specialization
    assert len(kernel.jit_calls) == 1
    # every parameter in order, defaults filled, the new grid
    assert kernel.compiled_calls == [((8, 1, 1), (x, 48, 0.25, 16, False))]


def test_a_new_specialization_goes_through_triton_again():
    kernel = FakeJit()
    launch = Launcher(kernel)
    x = torch.zeros(64)
    base = launch.specialization([x, 32, 0.5, 16, False], {"num_warps": 4})
    changed = {
        "misaligned tensor": ([x[1:], 32, 0.5, 16, False], {"num_warps": 4}),
        "dtype": ([x.double(), 32, 0.5, 16, False], {"num_warps": 4}),
        "int not divisible by 16": ([x, 33, 0.5, 16, False], {"num_warps": 4}),
        "int equal to 1": ([x, 1, 0.5, 16, False], {"num_warps": 4}),
        "int past 32 bits": ([x, 2**32, 0.5, 16, False], {"num_warps": 4}),
        "constexpr": ([x, 32, 0.5, 32, False], {"num_warps": 4}),
        "constexpr default": ([x, 32, 0.5, 16, True], {"num_warps": 4}),
        "option": ([x, 32, 0.5, 16, False], {"num_warps": 8}),
        "maxnreg": ([x, 32, 0.5, 16, False], {"num_warps": 4, "maxnreg": 128}),
        "launch_pdl": ([x, 32, 0.5, 16, False], {"num_warps": 4, "launch_pdl": True}),
    }
    for what, (values, kwargs) in changed.items():
        assert launch.specialization(values, kwargs) != base, what
    assert launch.specialization([x, 64, 0.1, 16, False], {"num_warps": 4}) == base
    for values, kwargs in changed.values():
        launch((1,), *values, **kwargs)
    assert len(kernel.jit_calls) == len(changed) and not kernel.compiled_calls


def test_interpreted_kernels_always_go_through_triton():
    class Interpreted:
        def __init__(self):
            self.fn, self.calls = (lambda x_ptr, N: None), []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))

    kernel = Interpreted()
    launch = Launcher(kernel)
    for _ in range(3):
        launch((2,), torch.zeros(4), N=8)
    assert launch.interpreted and len(kernel.calls) == 3
