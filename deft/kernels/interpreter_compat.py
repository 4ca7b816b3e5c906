"""Triton's CPU interpreter (``TRITON_INTERPRET=1``) with numpy >= 2.4 on triton <= 3.6.

Those interpreters read a loop bound held in a tensor with ``int()`` of a one-element array,
which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
`teach_old_interpreter_numpy_2_4` makes them take ``.item()``. Applied when the kernels load
under the interpreter (`deft.kernels`); compiled kernels are unaffected, newer interpreters
are left as they are.
"""

import inspect
import os


def teach_old_interpreter_numpy_2_4() -> None:
    """Patch the interpreter's tensor ``__index__`` where it still uses ``int()`` (idempotent)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "int(self.handle.data)" not in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def apply_if_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        teach_old_interpreter_numpy_2_4()
