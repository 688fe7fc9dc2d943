"""Record the gradient of every parameter an optimizer holds, after each backward pass and before
clipping: what a training step would apply. Used by ``test_distributed.py`` to compare the
gradients of a data-parallel run with those of one process.

In a test process: ``with recording() as steps: ...``. As a program (under torchrun)::

    python tests/gradient_recorder.py OUT.pt train ARGS...

runs ``delrec train ARGS...`` and rank 0 saves the list of steps (each a list of gradients, in
the order the optimizers were built) to ``OUT.pt``; the exit status is that of the command.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from unittest import mock

import torch


@contextmanager
def recording():
    """Yields a list that receives, after every ``backward()``, the gradients (clones, ``None``
    where absent) of the parameters of every optimizer built inside the block."""
    params: list[torch.Tensor] = []
    steps: list[list[torch.Tensor | None]] = []
    real_init, real_backward = torch.optim.Optimizer.__init__, torch.Tensor.backward

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        params.extend(p for group in self.param_groups for p in group["params"])

    def backward(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        if params:
            steps.append([None if p.grad is None else p.grad.detach().clone() for p in params])

    with (
        mock.patch.object(torch.optim.Optimizer, "__init__", init),
        mock.patch.object(torch.Tensor, "backward", backward),
    ):
        yield steps


if __name__ == "__main__":
    from delrec.cli import main

    out, command = sys.argv[1], sys.argv[2:]
    with recording() as recorded:
        status = main(command)
    if os.environ.get("RANK", "0") == "0":
        torch.save(recorded, out)
    sys.exit(status)
