"""The learning rate of Sec. 3.4 and 4.2: warm-up, fixed milestones or drops on a plateau."""
from __future__ import annotations

from repro.spec import OptimSpec


class LearningRate:
    """The rate for each iteration. Its state is a few numbers, saved in every checkpoint.

    Warm-up (ResNet-110/1202, Sec. 4.2): `warmup_lr` (or the scheduled rate, if smaller) until the
    running training error over the last `warmup_window` iterations falls below
    `warmup_until_train_error`, or at the latest at `warmup_max_iters` (our cap); then the schedule.
    Milestones: `lr` divided by 1/`lr_factor` at each milestone iteration (CIFAR: 32k, 48k).
    Plateau (ImageNet, Sec. 3.4): divided when the validation error has not improved by
    `plateau_threshold` points for `plateau_patience` epochs, at most `max_lr_drops` times (our choice).
    """

    def __init__(self, optim: OptimSpec):
        self.optim = optim
        self.warming_up = optim.warmup_lr is not None
        self.warmup_ended_at: int | None = None
        self.warmup_capped = False  # True when the warm-up ended at its cap, not on the training error
        self.plateau_drops = 0
        self.best_error = float("inf")
        self.epochs_without_improvement = 0

    def at(self, iteration: int) -> float:
        if self.optim.lr_schedule == "milestones":
            drops = sum(iteration >= m for m in self.optim.lr_milestones)
        else:
            drops = self.plateau_drops
        scheduled = self.optim.lr / (1 / self.optim.lr_factor) ** drops  # 0.1 / 10 is exactly 0.01
        # a warm-up never raises the rate above the schedule's (a milestone may come first)
        return min(self.optim.warmup_lr, scheduled) if self.warming_up else scheduled

    def end_warmup_if_trained(self, iteration: int, window_error: float) -> bool:
        """Called every `warmup_window` iterations while warming up; True when the warm-up ends,
        on the training error or at the cap."""
        if not self.warming_up:
            return False
        capped = iteration >= self.optim.warmup_max_iters
        if window_error < self.optim.warmup_until_train_error or capped:
            self.warming_up = False
            self.warmup_ended_at = iteration
            self.warmup_capped = capped and not window_error < self.optim.warmup_until_train_error
            return True
        return False

    def observe_validation(self, error: float) -> bool:
        """Called once per epoch with the validation error; drives the plateau schedule. True when the
        rate drops after this epoch."""
        if self.optim.lr_schedule != "plateau" or self.warming_up:
            return False
        if error < self.best_error - self.optim.plateau_threshold:
            self.best_error = error
            self.epochs_without_improvement = 0
            return False
        self.epochs_without_improvement += 1
        limit = self.optim.max_lr_drops
        if self.epochs_without_improvement >= self.optim.plateau_patience and (limit is None or self.plateau_drops < limit):
            self.plateau_drops += 1
            self.epochs_without_improvement = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("warming_up", "warmup_ended_at", "warmup_capped", "plateau_drops", "best_error",
                 "epochs_without_improvement")}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's schedule; ValueError for keys or values this class never writes (a crafted file)."""
        wrong = [key for key, value in state.items() if key not in self.state_dict()
                 or not isinstance(value, (bool, int, float, type(None)))]
        if wrong:
            raise ValueError(f"schedule: unexpected {', '.join(map(str, wrong))}")
        for key, value in state.items():
            setattr(self, key, value)
