"""One place for peft 0.21's friction with transformers 5, shared by the trainer, evaluator and serving."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def peft_wrap_quietly() -> Iterator[None]:
    """Wrapping a model in peft 0.21 probes transformers 5's deprecated `is_gradient_checkpointing`;
    that FutureWarning is about peft's code, not ours, and would otherwise fire on every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
