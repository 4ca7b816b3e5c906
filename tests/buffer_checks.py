"""What the plan-buffer tests share: the check that the buffers hold a plan's arrays, field by
field, and the staged path of a CUDA device played on the CPU (`MirrorUpload`)."""

import numpy as np
import torch

from deft.plan_buffers import FIELDS
from deft.staged_upload import rounded_span


def assert_buffers_hold(buffers, arrays: dict, context: str = "") -> None:
    """Every field of `buffers` (`deft.plan_buffers.PlanBuffers`) starts with the values of
    ``arrays[field]`` (`plan_arrays`); ``context`` prefixes the failure message."""
    for name in FIELDS:
        held = buffers.read(name)[:len(arrays[name])]
        np.testing.assert_array_equal(held, arrays[name], err_msg=f"{context}{name}")


class MirrorUpload:
    """The staged path of a CUDA device on the CPU: a host mirror that `PlanBuffers.fill`
    writes, and an upload that copies the mirror's spans (rounded out as
    `deft.staged_upload.StagedUpload.upload` rounds them) into the buffers, and nothing else."""

    def __init__(self, data: torch.Tensor):
        self.data, self.host = data, np.zeros(len(data), dtype=np.int32)
        self.uploads = 0

    def wait(self) -> None:
        pass

    def upload(self, spans) -> None:
        for lo, hi in spans:
            lo, hi = rounded_span(lo, hi, len(self.host))
            self.data[lo:hi] = torch.from_numpy(self.host[lo:hi])
            self.uploads += 1
