"""What a whole job sees of the world around it: its output folder, progress, previews, cancel.

The same job code runs under the HTTP worker (which stores progress in the job's status file),
under the command line (a progress bar) and in tests (nothing at all).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sampling import Cancelled

ProgressHook = Callable[[str, int, int], None]  # stage, step (1-based, 0 at a stage's start), total
PreviewHook = Callable[[np.ndarray], None]  # uint8 (H, W, 3)


@dataclass
class JobContext:
    """Hooks and settings for one run of a job.

    ``memory_level`` rises each time the worker retries after running out of GPU memory: jobs
    then trade speed for memory (guidance halves in separate calls, shorter interpolation
    windows). ``preview_every``: decode a preview every this many denoising steps (0: never).
    """

    out_dir: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: ProgressHook | None = None
    on_preview: PreviewHook | None = None
    memory_level: int = 0
    preview_every: int = 5
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def stage(self, name: str, total: int = 1) -> Iterator[None]:
        """Time a stage (seconds add up when a stage runs more than once) and report its start."""
        self.check_cancel()
        self.progress(name, 0, total)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def progress(self, stage: str, step: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, step, total)

    def preview(self, image: np.ndarray) -> None:
        if self.on_preview is not None:
            self.on_preview(image)

    def wants_preview(self, step: int, total: int) -> bool:
        return self.on_preview is not None and self.preview_every > 0 and (
            step % self.preview_every == 0 or step == total
        )

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")
