"""The Triton interpreter for tests on a machine without a GPU.

`use_interpreter_without_gpu` (called by conftest.py before any test module loads a kernel)
sets ``TRITON_INTERPRET=1`` when torch sees no CUDA device and teaches triton <= 3.6's
interpreter numpy >= 2.4; subprocesses that run kernels call it too.
"""

import inspect
import os

import torch


def teach_old_interpreter_numpy_2_4():
    """Triton <= 3.6's interpreter reads a loop bound held in a tensor with ``int()`` of a
    one-element array, which numpy >= 2.4 refuses; make it take ``.item()`` (tests only: the
    compiled kernels are unaffected)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "int(self.handle.data)" not in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def use_interpreter_without_gpu():
    """Run the kernels in the interpreter where there is no GPU (set before they load), except
    in a process that only compiles kernels (``DEFT_COMPILE_ONLY=1``)."""
    if not torch.cuda.is_available() and os.environ.get("DEFT_COMPILE_ONLY") != "1":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        teach_old_interpreter_numpy_2_4()
