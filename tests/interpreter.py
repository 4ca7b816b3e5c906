"""The Triton interpreter for tests on a machine without a GPU.

`use_interpreter_without_gpu` (called by conftest.py before any test module loads a kernel)
sets ``TRITON_INTERPRET=1`` when torch sees no CUDA device (`deft.kernels` then teaches an old
interpreter numpy >= 2.4); subprocesses that run kernels call it too.
"""

import os

import torch


def use_interpreter_without_gpu():
    """Run the kernels in the interpreter where there is no GPU (set before they load), except
    in a process that only compiles kernels (``DEFT_COMPILE_ONLY=1``)."""
    if not torch.cuda.is_available() and os.environ.get("DEFT_COMPILE_ONLY") != "1":
        os.environ.setdefault("TRITON_INTERPRET", "1")
