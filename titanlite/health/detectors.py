"""The recipe's loss-curve diagnosis as code: spike, plateau, divergence, grad-norm watch.

Pure host-side Python over one value per observed step, so the same detectors run inside the
trainer (fed every step's loss and grad norm, synced in one batch per log step) and in
`titanlite.diagnose` (fed the logged steps of metrics.jsonl). Windows count observations.

The signals (seed chapter 11, section 3):
  spike       loss far above its recent trend: log(loss) more than `spike_sigma` robust sigmas
              (median absolute deviation) above a straight-line fit of log(loss) on log(step)
              over the last `spike_window` normal steps (healthy training is a straight line on
              log-log axes, so the fit follows the decline instead of lagging it as a mean does),
              and at least `spike_min_ratio` times the trend. Stricter (`spike_sigma_early`) in
              the first `early_steps`, where the recipe says spikes matter most. A loss of
              `fault_ratio` x the largest of the first 100 steps is flagged at once (a hardware
              or data fault: Megatron's rule).
  plateau     the slope of loss against ln(step) over the last max(plateau_window,
              plateau_window_fraction x step) steps is flatter than -plateau_slope (loss units per
              e-fold of steps). Against ln(step) because a healthy power law keeps a roughly
              constant slope there, while its slope per step shrinks towards 0.
  divergence  a non-finite loss; more than `max_overflow_steps` skipped (non-finite gradient)
              steps within `divergence_window`; or a sustained rise: the median loss of the last
              `divergence_window` steps `divergence_rise` above the best such median.
  grad_norm   after warmup, the pre-clip norm above `grad_norm_factor` x grad_clip on more than
              `grad_norm_fraction` of the last `grad_norm_window` steps (the recipe's "LR too high").
Persistent signals (plateau, divergence by rise, grad_norm) fire once and re-arm when they clear.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

SIGNALS = ("spike", "plateau", "divergence", "grad_norm")
SPIKE_MAX_STEPS = 10  # the recipe's spike "returns within a few steps"; longer is a level shift


@dataclass
class Event:
    """One health finding. `start_step` is where the trouble began (== step for a spike)."""

    step: int
    signal: str  # one of SIGNALS
    message: str
    start_step: int
    value: float = float("nan")  # the loss, slope or fraction that tripped the signal

    def to_dict(self) -> dict:
        return asdict(self)


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the std of Gaussian noise, blind to a few outliers."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


class Detectors:
    """Feed `observe()` one step at a time, in step order; it returns the events of that step.

    `settings` is the [health] config section (or any object with its fields); `grad_clip` and
    `warmup_steps` come from the training config. State round-trips through state_dict().
    """

    def __init__(self, settings, grad_clip: float, warmup_steps: int):
        self.settings, self.grad_clip, self.warmup_steps = settings, grad_clip, warmup_steps
        s = settings
        self.spike_history: deque = deque(maxlen=s.spike_window)  # (ln step, ln loss), spikes left out
        self.rise_history: deque = deque(maxlen=s.divergence_window)  # losses
        self.overflow_steps: deque = deque()  # steps whose update was skipped, within the window
        self.grad_norm_high: deque = deque(maxlen=s.grad_norm_window)  # bools
        self.plateau_points: list[tuple[int, float]] = []  # (step, mean loss of a bucket)
        self.bucket: list[float] = []
        self.early_max = 0.0  # largest loss of the first 100 steps
        self.spike_run = 0  # consecutive steps above the spike threshold
        self.best_median = math.inf
        self.active = {"plateau": False, "rise": False, "grad_norm": False, "overflow": False}

    def observe(self, step: int, loss: float, grad_norm: float = math.nan, skipped: bool = False) -> list[Event]:
        events: list[Event] = []
        s = self.settings
        if not math.isfinite(loss):
            return [Event(step, "divergence", f"loss is {loss} at step {step}", step, loss)]
        if skipped:
            self.overflow_steps.append(step)
        while self.overflow_steps and self.overflow_steps[0] <= step - s.divergence_window:
            self.overflow_steps.popleft()
        too_many = len(self.overflow_steps) > s.max_overflow_steps
        if too_many and not self.active["overflow"]:
            events.append(Event(step, "divergence", f"{len(self.overflow_steps)} steps with non-finite gradients "
                                f"in the last {s.divergence_window} steps", self.overflow_steps[0],
                                len(self.overflow_steps)))
        self.active["overflow"] = too_many
        spike = self._spike(step, loss)
        events += [spike] if spike else []
        events += self._rise(step, loss)  # a median window shrugs off short spikes
        if not self.spike_run:
            events += self._plateau(step, loss)
        if math.isfinite(grad_norm):
            events += self._grad_norm(step, grad_norm)
        return events

    def _spike(self, step: int, loss: float) -> Event | None:
        s = self.settings
        if step <= 100:
            self.early_max = max(self.early_max, loss)
        elif self.early_max > 0 and loss >= s.fault_ratio * self.early_max:
            return Event(step, "spike", f"loss {loss:.4g} is >= {s.fault_ratio:g}x the largest of the first 100 "
                         f"steps ({self.early_max:.4g}): likely a hardware or data fault", step, loss)
        log_step, log_loss = math.log(max(step, 1)), math.log(max(loss, 1e-12))
        event = None
        if len(self.spike_history) >= s.spike_min_history:
            trend, sigma = self._trend(log_step)
            k = s.spike_sigma_early if step <= s.early_steps else s.spike_sigma
            excess = log_loss - trend
            if excess > k * sigma and excess > math.log(s.spike_min_ratio):
                self.spike_run += 1
                if self.spike_run == 1:  # one event per spike, at its first step: that batch caused it
                    early = ", early phase" if step <= s.early_steps else ""
                    event = Event(step, "spike", f"loss {loss:.4g} vs trend {math.exp(trend):.4g} "
                                  f"({excess / sigma:.1f} sigma{early})", step, loss)
                if self.spike_run <= SPIKE_MAX_STEPS:
                    return event  # an isolated spike stays out of the history: it would bend the fit
                # A "spike" that does not come back is a new level: let the trend follow it (the
                # divergence detector judges sustained rises).
            else:
                self.spike_run = 0
        self.spike_history.append((log_step, log_loss))
        return event

    def _trend(self, log_step: float) -> tuple[float, float]:
        """Least-squares line of ln(loss) on ln(step) over the history: (value at log_step, robust sigma)."""
        xs, ys = np.array(self.spike_history).T
        x_mean, y_mean = xs.mean(), ys.mean()
        spread = float(((xs - x_mean) ** 2).sum())
        slope = float(((xs - x_mean) * (ys - y_mean)).sum()) / spread if spread > 0 else 0.0
        residuals = ys - (y_mean + slope * (xs - x_mean))
        sigma = max(robust_sigma(residuals), 1e-3)  # floor: a perfectly flat history has sigma 0
        return y_mean + slope * (log_step - x_mean), sigma

    def _rise(self, step: int, loss: float) -> list[Event]:
        s = self.settings
        self.rise_history.append(loss)
        if len(self.rise_history) < s.divergence_window:
            return []
        median = float(np.median(self.rise_history))
        self.best_median = min(self.best_median, median)
        rising = median > self.best_median * (1 + s.divergence_rise)
        fired = rising and not self.active["rise"]
        self.active["rise"] = rising
        if not fired:
            return []
        return [Event(step, "divergence", f"sustained rise: median loss of the last {s.divergence_window} steps "
                      f"{median:.4g} vs best {self.best_median:.4g}", step - s.divergence_window + 1, median)]

    def _plateau(self, step: int, loss: float) -> list[Event]:
        s = self.settings
        self.bucket.append(loss)
        if len(self.bucket) < 10:  # fit bucket means: 10x fewer points, same slope
            return []
        self.plateau_points.append((step, sum(self.bucket) / len(self.bucket)))
        self.bucket = []
        window = max(s.plateau_window, int(s.plateau_window_fraction * step))
        start = step - window
        while len(self.plateau_points) > 1 and self.plateau_points[1][0] <= start:
            self.plateau_points.pop(0)  # keep one point at or before the window start
        first_step = self.plateau_points[0][0]
        if first_step > start + 10 or first_step <= self.warmup_steps or len(self.plateau_points) < 10:
            return []  # the window is not yet filled with post-warmup steps
        steps, losses = np.array(self.plateau_points).T
        slope = float(np.polyfit(np.log(steps), losses, 1)[0])
        if self.active["plateau"]:
            self.active["plateau"] = slope > -2 * s.plateau_slope  # hysteresis: re-arm on a clear decline
            return []
        if slope <= -s.plateau_slope:
            return []
        self.active["plateau"] = True
        return [Event(step, "plateau", f"loss changed {slope:+.4f} per e-fold of steps over steps "
                      f"{int(first_step)}..{step} (threshold -{s.plateau_slope:g})", int(first_step), slope)]

    def _grad_norm(self, step: int, grad_norm: float) -> list[Event]:
        s = self.settings
        if self.grad_clip <= 0 or step <= self.warmup_steps:
            return []
        self.grad_norm_high.append(grad_norm > s.grad_norm_factor * self.grad_clip)
        if len(self.grad_norm_high) < s.grad_norm_window:
            return []
        fraction = sum(self.grad_norm_high) / len(self.grad_norm_high)
        high = fraction > s.grad_norm_fraction
        fired = high and not self.active["grad_norm"]
        self.active["grad_norm"] = high
        if not fired:
            return []
        return [Event(step, "grad_norm", f"pre-clip grad norm above {s.grad_norm_factor:g} x grad_clip "
                      f"({self.grad_clip:g}) on {fraction:.0%} of the last {s.grad_norm_window} steps: "
                      "the learning rate is likely too high", step - s.grad_norm_window + 1, fraction)]

    def state_dict(self) -> dict:
        return {"spike_history": list(self.spike_history), "rise_history": list(self.rise_history),
                "overflow_steps": list(self.overflow_steps), "grad_norm_high": list(self.grad_norm_high),
                "plateau_points": list(self.plateau_points), "bucket": list(self.bucket),
                "early_max": self.early_max, "spike_run": self.spike_run, "best_median": self.best_median, "active": dict(self.active)}

    def load_state_dict(self, state: dict) -> None:
        self.spike_history.clear()
        self.spike_history.extend(tuple(p) for p in state["spike_history"])
        self.rise_history.clear()
        self.rise_history.extend(state["rise_history"])
        self.overflow_steps = deque(state["overflow_steps"])
        self.grad_norm_high.clear()
        self.grad_norm_high.extend(state["grad_norm_high"])
        self.plateau_points = [tuple(p) for p in state["plateau_points"]]
        self.bucket = list(state["bucket"])
        self.early_max, self.best_median = float(state["early_max"]), float(state["best_median"])
        self.spike_run = int(state["spike_run"])
        self.active = dict(state["active"])
