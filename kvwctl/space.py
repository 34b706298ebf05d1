"""The search space of ``kvwctl tune``: the settings a trial can take, parsed from flags.

    >>> gamma_values("0.01:1:log3")
    [0.01, 0.1, 1.0]
    >>> mean_gate_values("0.99:0.9:2")
    [0.99, 0.9]
    >>> layer_selections("14:27,8:27,:", 30)
    ['14:27', '8:27', ':']
    >>> batch_sizes("1,7,all")
    [1, 7, None]

A **trial** (:class:`TrialSettings`) is one value of each axis: the profiled ``positions``, the
accessor's ``forget_batch_size`` (None: every forget sample in one batch), a ``layers`` selection
and the weakening strength, given either directly as ``gamma`` or as a ``mean_gate`` target, for
which γ is solved per trial (``kvwctl.method.gamma_for_mean_gate``) so that the mean gate over the
trial's exposed vectors (E > 0 in its layers) hits the target. A mean gate carries over between
forget sets of different sizes; a γ does not, since ``E = Σ_b A_b`` grows with the number of batches.

Axis syntax:

* ``--gamma``: a comma list (``0.1,0.3,1``) or ``START:STOP:N`` (N values from START to STOP,
  both included, evenly spaced) or ``START:STOP:logN`` (evenly spaced in log space);
* ``--mean-gate``: the same syntax, values in (0, 1);
* ``--layers``: a comma list of selections, each one range of apply's syntax (``14:27``, ``:26``,
  ``2:``, ``:``, or one layer), or ``auto``: the paper's bucket rule (:func:`auto_layers`);
* ``--forget-batch-size``: a comma list of positive integers and ``all``;
* ``--positions``: a comma list of profile position modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvwctl.conversation import POSITION_MODES
from kvwctl.errors import UsageError
from kvwctl.method import layer_ranges


@dataclass(frozen=True)
class TrialSettings:
    """One point of the search space; exactly one of ``gamma`` and ``mean_gate`` is set."""

    positions: str
    forget_batch_size: int | None  # None: all forget samples in one batch
    layers: str
    gamma: float | None = None
    mean_gate: float | None = None

    @property
    def batch_text(self) -> str:
        return "all" if self.forget_batch_size is None else str(self.forget_batch_size)

    def to_json(self) -> dict[str, object]:
        return {
            "positions": self.positions,
            "forget_batch_size": self.batch_text,
            "layers": self.layers,
            "gamma": self.gamma,
            "mean_gate": self.mean_gate,
        }


def _numbers(text: str, flag: str) -> list[float]:
    text = text.strip()
    parts = text.split(":")
    try:
        if len(parts) == 3:
            start, stop, count_text = float(parts[0]), float(parts[1]), parts[2].strip()
            log = count_text.startswith("log")
            count = int(count_text.removeprefix("log"))
            if count < 1:
                raise ValueError
            if count == 1:
                return [start]
            if log:
                if start <= 0 or stop <= 0:
                    raise UsageError(f"{flag} {text!r}: a log range needs positive ends")
                low, high = math.log10(start), math.log10(stop)
                return [float(f"{10 ** (low + (high - low) * i / (count - 1)):.6g}") for i in range(count)]
            return [float(f"{start + (stop - start) * i / (count - 1):.6g}") for i in range(count)]
        if len(parts) == 1:
            return [float(item) for item in text.split(",")]
    except ValueError:
        pass
    raise UsageError(
        f"invalid {flag} {text!r}", hint="use a list (0.1,0.3,1), START:STOP:N or START:STOP:logN (e.g. 0.01:30:log12)"
    )


def gamma_values(text: str) -> list[float]:
    """γ values: positive, finite, in the order given, duplicates removed."""
    values = _numbers(text, "--gamma")
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--gamma {text!r}: every value must be a positive number, got {value!r}")
    return list(dict.fromkeys(values))


def mean_gate_values(text: str) -> list[float]:
    """Mean-gate targets: strictly between 0 and 1, in the order given, duplicates removed."""
    values = _numbers(text, "--mean-gate")
    for value in values:
        if not 0 < value < 1:
            raise UsageError(f"--mean-gate {text!r}: every value must be between 0 and 1 (exclusive), got {value!r}")
    return list(dict.fromkeys(values))


def auto_layers(num_layers: int) -> list[str]:
    """The paper's rule: the layers split into eight buckets, the start layer searched in the first
    bucket and the end layer in the last; here the ends of each bucket, 2 × 2 ranges.

    >>> auto_layers(30)
    ['0:29', '0:26', '3:29', '3:26']
    """
    bucket = max(1, math.ceil(num_layers / 8))
    last = num_layers - 1
    starts = list(dict.fromkeys([0, min(bucket - 1, last)]))
    ends = list(dict.fromkeys([last, max(last - bucket + 1, 0)]))
    return [f"{start}:{end}" for start in starts for end in ends if start <= end]


def layer_selections(text: str, num_layers: int) -> list[str]:
    """Layer selections to try; each checked against the model's depth (``kvwctl.method``)."""
    from kvwctl.method import parse_layers

    if text.strip() == "auto":
        return auto_layers(num_layers)
    selections = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in selections):
        raise UsageError(f"invalid --layers {text!r}", hint="use e.g. 14:27,8:27,: or auto")
    for item in selections:
        layer_ranges(item)  # the syntax
        parse_layers(item, num_layers)  # the range
    return list(dict.fromkeys(selections))


def batch_sizes(text: str) -> list[int | None]:
    """Accessor batch sizes; ``all`` (None) puts every forget sample in one batch."""
    sizes: list[int | None] = []
    for item in (part.strip() for part in text.split(",")):
        if item == "all":
            sizes.append(None)
        elif item.isascii() and item.isdigit() and int(item) >= 1:
            sizes.append(int(item))
        else:
            raise UsageError(f"invalid --forget-batch-size {text!r}: {item!r}", hint="use e.g. 1,7,all")
    return list(dict.fromkeys(sizes))


def position_modes(text: str) -> list[str]:
    modes = [item.strip() for item in text.split(",")]
    for mode in modes:
        if mode not in POSITION_MODES:
            raise UsageError(f"invalid --positions {text!r}: {mode!r}", hint=f"choose from {', '.join(POSITION_MODES)}")
    return list(dict.fromkeys(modes))


def grid(
    positions: list[str],
    forget_batch_sizes: list[int | None],
    layers: list[str],
    *,
    gammas: list[float] | None = None,
    mean_gates: list[float] | None = None,
) -> list[TrialSettings]:
    """Every combination, positions outermost and strength innermost (the order trials run in)."""
    if (gammas is None) == (mean_gates is None):
        raise ValueError("exactly one of gammas and mean_gates")
    trials = []
    for mode in positions:
        for size in forget_batch_sizes:
            for selection in layers:
                if gammas is not None:
                    trials += [TrialSettings(mode, size, selection, gamma=value) for value in gammas]
                else:
                    assert mean_gates is not None
                    trials += [TrialSettings(mode, size, selection, mean_gate=value) for value in mean_gates]
    return trials
