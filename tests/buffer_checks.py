"""The check the plan-buffer tests share: the buffers hold a plan's arrays, field by field."""

import numpy as np

from deft.plan_buffers import FIELDS


def assert_buffers_hold(buffers, arrays: dict, context: str = "") -> None:
    """Every field of `buffers` (`deft.plan_buffers.PlanBuffers`) starts with the values of
    ``arrays[field]`` (`plan_arrays`); ``context`` prefixes the failure message."""
    for name in FIELDS:
        held = buffers.read(name)[:len(arrays[name])]
        np.testing.assert_array_equal(held, arrays[name], err_msg=f"{context}{name}")
