"""What a training run counts besides its weights, saved in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RunState:
    """The optimizer steps taken, the best validation so far (its step and val bits/dim), how many
    validations since then did not improve on it, and the tracking run."""

    step: int = 0
    best_step: int = -1
    best_val_bpd: float = math.inf
    bad_validations: int = 0
    run_id: str | None = None

    def stopped_early(self, patience: int) -> bool:
        """``patience`` validations in a row did not improve (never when patience is 0)."""
        return 0 < patience <= self.bad_validations
