"""One place for peft 0.21's friction with transformers 5, shared by the trainer, evaluator and serving."""

from __future__ import annotations

import warnings

PEFT_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


def ignore_peft_deprecation() -> None:
    """Wrapping a model in peft 0.21 probes transformers 5's deprecated `is_gradient_checkpointing`;
    that FutureWarning is about peft's code, not ours, and would otherwise fire on every load.

    Installed for the process (idempotent), not around each call: `warnings.catch_warnings` swaps the
    process-wide filter list, so two threads loading at once (two serving replicas in one process, the
    trainer beside serving in `flywheel up`) would each restore the list the other had changed and
    drop its filter mid-load; where warnings are errors (the tests) that load then fails."""
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
