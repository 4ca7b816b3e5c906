"""What the plan-buffer tests share: the check that the buffers hold a plan's arrays, field by
field, and the staged path of a CUDA device played on the CPU (`MirrorUpload`)."""

import numpy as np
import torch

from deft.plan_buffers import FIELDS


def assert_buffers_hold(buffers, arrays: dict, context: str = "") -> None:
    """Every field of `buffers` (`deft.plan_buffers.PlanBuffers`) starts with the values of
    ``arrays[field]`` (`plan_arrays`); ``context`` prefixes the failure message."""
    for name in FIELDS:
        held = buffers.read(name)[:len(arrays[name])]
        np.testing.assert_array_equal(held, arrays[name], err_msg=f"{context}{name}")


class MirrorUpload:
    """The staged path of a CUDA device on the CPU: a host mirror that `PlanBuffers.fill`
    writes, and an upload that copies the mirror's rectangles into the buffers
    (`deft.staged_upload.StagedUpload.upload`), and nothing else."""

    def __init__(self, data: torch.Tensor):
        self.data, self.host = data, np.zeros(len(data), dtype=np.int32)
        self.uploads = 0

    def wait(self) -> None:
        pass

    def upload(self, copies) -> None:
        for lo, width, height, pitch in copies:
            for row in range(lo, lo + height * pitch, pitch):
                self.data[row:row + width] = torch.from_numpy(self.host[row:row + width])
            self.uploads += 1
