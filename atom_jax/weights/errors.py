"""The one error type of the checkpoint-reading layer."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked. The message names the file and the tensor."""

    def __init__(self, file: str | os.PathLike | None, tensor: str | None, problem: str):
        self.file = None if file is None else os.fspath(file)
        self.tensor = tensor
        self.problem = problem
        where = self.file or "<checkpoint>"
        what = f"tensor {tensor!r}: " if tensor is not None else ""
        super().__init__(f"{where}: {what}{problem}")
