"""KL coefficient controllers: a fixed coefficient, or the adaptive
controller of Ziegler et al. (2019), "Fine-Tuning Language Models from Human
Preferences", section 2.2: the coefficient follows a proportional rule that
steers the observed KL per sequence towards a target,

    e = clip(KL_observed / KL_target - 1, -0.2, 0.2)
    beta <- beta * clip(1 + e * n / horizon, 0.5, 1.5)

where ``n`` is the number of sequences the observation covers (the factor
is bounded so that a batch of more than 5 x horizon sequences cannot flip
the coefficient's sign)."""
import dataclasses
import math
from typing import Optional


@dataclasses.dataclass
class KLController:
    """``coef`` is the current coefficient; ``target=None`` keeps it fixed."""

    coef: float
    target: Optional[float] = None
    horizon: int = 10000

    def update(self, observed_kl, n_sequences):
        """Move ``coef`` after an iteration whose mean KL per sequence was
        ``observed_kl`` (a float) over ``n_sequences``. A non-finite
        observation leaves ``coef`` unchanged."""
        if self.target is None or not math.isfinite(observed_kl):
            return
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        # A batch larger than 5 x horizon would make the factor <= 0 (a coefficient that rewards drift):
        # the step is bounded to a halving or a 1.5x growth.
        self.coef *= min(max(1.0 + error * n_sequences / self.horizon, 0.5), 1.5)

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        """Continue from a saved controller. Its settings (``target``,
        ``horizon``) stay this controller's, the configured ones; the
        coefficient is the saved one under the adaptive rule (the state it
        steered to), this one's when fixed. Returns the list of what differs
        from the saved controller, for the caller to report."""
        changes = [f"{key} {state[key]!r} -> {getattr(self, key)!r}" for key in ("target", "horizon")
                   if key in state and state[key] != getattr(self, key)]
        if self.target is not None and state.get("target") is not None:
            self.coef = state["coef"]
        elif state.get("coef") != self.coef:
            changes.append(f"coef {state.get('coef')!r} -> {self.coef!r}")
        return changes
