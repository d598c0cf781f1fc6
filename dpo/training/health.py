"""Health alarms: warnings for a run going wrong in ways a falling loss hides.

``HealthMonitor`` (thresholds in ``HealthConfig``, the config's ``health:`` section) watches

- the logged training metrics: **likelihood displacement** (the chosen answers' per-token NLL rising
  above its first logged value while the reward margin grows: DPO is pushing both answers down),
  a **saturated margin** (``rewards/margins`` past ``max_margin``: the loss has nothing left to
  learn and only log-probs to destroy) and **grad-norm spikes** (a multiple of the median of the
  earlier logs; the norm is measured before clipping);
- at each evaluation, the policy's answers to held-out prompts against the reference model's
  (its answers at step 0): **length drift**, **repetition** (``repeat_4``, the share of the
  answers' 4-grams that repeat one already used in the same answer, after Welleck et al. 2019's
  seq-rep-4; ``distinct_2``, distinct bigrams over all bigrams, Li et al. 2016) and **reward
  hacking** (the held-out judge score, or without a judge the val split's preference accuracy,
  falling below its best while the training reward margin keeps rising).

An alarm is a console warning plus a metrics.jsonl row ``{"split": "alarm", "alarm": name,
"message": ..., name: value, name + "_threshold": threshold}``; each alarm fires once per run, the
first time its condition holds (a condition hovering at its threshold would otherwise warn at every
log; the train, val and heldout rows keep the values over time). Held-out answers come from a
*probe* the caller passes (``fastdpo.generation.heldout.HeldoutProbe``: sampling lives in the
generation room, above this one); without a probe only the metric alarms run. The held-out
statistics are logged as ``heldout`` rows, the step-0 row being the reference's (a resumed run
reads it back from metrics.jsonl).
"""
from __future__ import annotations

import json
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdpo.training.config import HealthConfig


def repetition_stats(answers: Sequence[Sequence[int]]) -> dict:
    """``length`` (mean tokens), ``repeat_4`` and ``distinct_2`` (module docstring) of answers."""
    grams = repeats = bigrams = 0
    distinct: set = set()
    for a in answers:
        a = list(a)
        fours = list(zip(a, a[1:], a[2:], a[3:]))
        grams += len(fours)
        repeats += len(fours) - len(set(fours))
        pairs = list(zip(a, a[1:]))
        bigrams += len(pairs)
        distinct.update(pairs)
    return {"length": sum(map(len, answers)) / len(answers) if answers else 0.0,
            "repeat_4": repeats / grams if grams else 0.0,
            "distinct_2": len(distinct) / bigrams if bigrams else None}


@dataclass
class Alarm:
    name: str
    message: str
    value: float
    threshold: float

    def row(self) -> dict:
        return {"alarm": self.name, "message": self.message, self.name: self.value,
                f"{self.name}_threshold": self.threshold}


# A probe answers held-out prompts: (model, tokenizer, default prompt ids, autocast dtype) ->
# {"answers": [token ids per prompt], "score": mean judge score or None}.
Probe = Callable[..., dict]


class HealthMonitor:
    def __init__(self, cfg: HealthConfig | None = None, probe: Probe | None = None, reference_model=None):
        self.cfg, self.probe, self.reference_model = cfg or HealthConfig(), probe, reference_model
        self._first: dict | None = None             # the first logged training row
        self._grad_norms: deque[float] = deque(maxlen=20)
        self._last_train: dict = {}
        self._last_val: dict = {}
        self._reference: dict | None = None         # held-out statistics of the reference model
        self._best: tuple[float, float] | None = None   # (best held-out signal, train margin then)
        self._fired: set[str] = set()

    def probes(self, trainer) -> bool:
        """Whether held-out answers are sampled: a probe, prompts to answer, and one process (a
        sharded model cannot sample on its own)."""
        return (self.cfg.enabled and self.probe is not None and self.cfg.n_prompts > 0
                and getattr(trainer, "parallel", None) is None)

    def _heldout(self, trainer, model) -> dict | None:
        model.eval()
        dtype = torch.bfloat16 if trainer.precision == "bf16" else None
        out = self.probe(model, trainer.tokenizer, trainer.task.heldout_prompts(), dtype)
        if out is None:
            return None
        stats = repetition_stats(out["answers"])
        if out.get("score") is not None:
            stats["score"] = out["score"]
        return stats

    # -- the trainer's hooks: each returns (split, row) pairs to log -------------------------
    def on_start(self, trainer) -> list[tuple[str, dict]]:
        """The reference's held-out statistics: measured at step 0 (the policy has not moved yet,
        unless a separate reference model was given), or read back from metrics.jsonl on resume."""
        if not self.probes(trainer):
            return []
        if trainer.state.step == 0:
            self._reference = self._heldout(trainer, self.reference_model or trainer.model)
            return [("heldout", self._reference)] if self._reference is not None else []
        self._reference = _logged_reference(Path(trainer.run_dir) / "metrics.jsonl")
        return []

    def on_evaluate(self, trainer) -> list[tuple[str, dict]]:
        heldout = self._heldout(trainer, trainer.model) if self.probes(trainer) else None
        rows = [("heldout", heldout)] if heldout is not None else []
        return rows + [("alarm", a.row()) for a in self.check_evaluation(heldout)]

    def on_record(self, metrics: dict, split: str) -> list[tuple[str, dict]]:
        return [("alarm", a.row()) for a in self.check_metrics(metrics, split)]

    # -- checks ----------------------------------------------------------------------------
    def check_metrics(self, metrics: dict, split: str) -> list[Alarm]:
        """Alarms on a logged train row (a val row is kept for the next evaluation's checks)."""
        if split == "val":
            self._last_val = metrics
        if not self.cfg.enabled or split != "train":
            return []
        cfg, found = self.cfg, {}
        first = self._first = self._first or metrics
        self._last_train = metrics
        nll, margin = metrics.get("loss/nll_chosen"), metrics.get("rewards/margins")
        if nll is not None and margin is not None and "loss/nll_chosen" in first:
            rise = nll - first["loss/nll_chosen"]
            if rise > cfg.displacement_per_token and margin > first["rewards/margins"]:
                found["likelihood_displacement"] = Alarm(
                    "likelihood_displacement",
                    f"likelihood displacement: the chosen answers' NLL rose {rise:.3f} nats/token above its "
                    f"first logged value ({first['loss/nll_chosen']:.3f} -> {nll:.3f}) while the reward "
                    f"margin grew ({first['rewards/margins']:.3f} -> {margin:.3f}); DPO is pushing both "
                    f"answers down (try rpo_alpha > 0, a lower learning_rate or a higher beta)",
                    rise, cfg.displacement_per_token)
        if margin is not None and margin > cfg.max_margin:
            found["margin_blowup"] = Alarm(
                "margin_blowup", f"reward margin {margin:.2f} > {cfg.max_margin:g}: the preference loss is "
                f"saturated and training only drives log-probs apart (lower learning_rate, fewer epochs, "
                f"higher beta)", margin, cfg.max_margin)
        grad = metrics.get("grad_norm")
        if grad is not None:
            if len(self._grad_norms) >= 3:
                median = statistics.median(self._grad_norms)
                if median > 0 and grad > cfg.grad_norm_spike * median:
                    found["grad_norm_spike"] = Alarm(
                        "grad_norm_spike", f"grad norm {grad:.3g} is {grad / median:.1f}x the median of the "
                        f"earlier logs ({median:.3g}); the update was clipped to max_grad_norm, but a "
                        f"spike often precedes divergence", grad / median, cfg.grad_norm_spike)
            self._grad_norms.append(grad)
        return self._first_time(found)

    def check_evaluation(self, heldout: dict | None) -> list[Alarm]:
        """Alarms on the held-out answers of an evaluation (and the val metrics logged just before)."""
        if not self.cfg.enabled:
            return []
        cfg, ref, found = self.cfg, self._reference, {}
        if heldout is not None and ref is not None:
            if ref["length"] > 0:
                drift = heldout["length"] / ref["length"] - 1
                if abs(drift) > cfg.length_drift:
                    found["length_drift"] = Alarm(
                        "length_drift", f"held-out answers are {heldout['length']:.1f} tokens long on "
                        f"average, {drift:+.0%} against the reference model's {ref['length']:.1f}",
                        drift, cfg.length_drift)
            rise = heldout["repeat_4"] - ref["repeat_4"]
            d, d_ref = heldout["distinct_2"], ref["distinct_2"]
            if rise > cfg.repetition_rise:
                found["repetition"] = Alarm(
                    "repetition", f"held-out answers repeat themselves: {heldout['repeat_4']:.0%} of their "
                    f"4-grams are repeats (reference {ref['repeat_4']:.0%})", rise, cfg.repetition_rise)
            elif d is not None and d_ref and d < (1 - cfg.distinct_drop) * d_ref:
                found["repetition"] = Alarm(
                    "repetition", f"held-out answers lost variety: distinct-2 {d:.3f} against the "
                    f"reference's {d_ref:.3f}", 1 - d / d_ref, cfg.distinct_drop)
        signal, what = None, None
        if heldout is not None and "score" in heldout:
            signal, what = heldout["score"], "held-out judge score"
            if self._best is None and ref is not None and "score" in ref:
                self._best = (ref["score"], 0.0)     # the reference: margin 0 by definition
        elif "rewards/accuracies" in self._last_val:
            signal, what = self._last_val["rewards/accuracies"], "val preference accuracy"
        margin = self._last_train.get("rewards/margins")
        if signal is not None and margin is not None:
            if self._best is not None and signal < (1 - cfg.hacking_drop) * self._best[0] \
                    and margin > self._best[1]:
                found["reward_hacking"] = Alarm(
                    "reward_hacking", f"{what} fell to {signal:.3f} from its best {self._best[0]:.3f} while "
                    f"the training reward margin rose ({self._best[1]:.3f} -> {margin:.3f}): the policy may "
                    f"be gaming the preference signal", 1 - signal / self._best[0], cfg.hacking_drop)
            if self._best is None or signal > self._best[0]:
                self._best = (signal, margin)
        return self._first_time(found)

    def _first_time(self, found: dict[str, Alarm]) -> list[Alarm]:
        new = [a for name, a in found.items() if name not in self._fired]
        self._fired |= set(found)
        return new


def _logged_reference(path: Path) -> dict | None:
    """The step-0 ``heldout`` row of a run being resumed (the reference model's statistics)."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("split") == "heldout" and row.get("step") == 0:
            return {k: v for k, v in row.items() if k not in ("step", "split")}
    return None
