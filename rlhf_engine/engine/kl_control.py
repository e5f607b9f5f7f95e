"""KL coefficient controllers: a fixed coefficient, or the adaptive
controller of Ziegler et al. (2019), "Fine-Tuning Language Models from Human
Preferences", section 2.2: the coefficient follows a proportional rule that
steers the observed KL per sequence towards a target,

    e = clip(KL_observed / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n / horizon)

where ``n`` is the number of sequences the observation covers."""
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
        self.coef *= 1.0 + error * n_sequences / self.horizon

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)
