"""The eval report (``kvwctl.eval/2``): what ``kvwctl eval`` measured, typed, and its JSON form.

    report.results["model"]["forget"]["keyword_acc"].mean   # the --model's forget keyword accuracy
    report.to_json()                                         # exactly what eval.json holds

Code reads the typed fields; ``to_json`` gives the file, key order included (it has no
timestamps, so the same inputs give the same bytes). A metric with a NaN or infinite value has a
null mean and is listed in ``non_finite`` as ``role.split.metric``; the file never holds NaN. Format 2 renamed format 1's ``gates`` to
``requirements`` and each outcome's ``gate`` key to ``requirement``; nothing else changed.
A redacted report (``--redact``) ends with ``"redacted": true`` and ``redaction`` (the scheme), and
its ``data.<split>.path`` values are keyed hashes. With ``eval --protocol`` a ``protocol`` object
(``kvwctl.protocols``) holds the benchmark's own numbers, each metric named after its protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvwctl import __version__
from kvwctl.metrics import METRICS, Results
from kvwctl.requirements import RequirementOutcome

EVAL_FORMAT = "kvwctl.eval/2"


@dataclass(frozen=True)
class ModelInfo:
    """One evaluated model: what was asked for, what was loaded and the dtype it ran in."""

    reference: str
    revision: str | None  # the resolved Hub commit; None for a local directory
    fingerprint: str
    model_type: str
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SplitInfo:
    """One evaluated data split: its file, that file's sha256 and its sample counts."""

    path: str
    sha256: str
    samples: int
    with_options: int
    fold: str | None = None  # "K/N by FIELD" with eval --fold: only that fold's samples were evaluated

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        if self.fold is None:
            del record["fold"]
        return record


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int
    batch_size: int
    device: str
    dtype: str  # as requested (e.g. auto); each model's actual dtype is in its ModelInfo
    decoding: str
    seed: int
    rouge: str
    keyword_match: str
    versions: dict[str, str]  # package -> version, for torch, transformers and rouge-score

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    """Per role (model, baseline, reference) and split, a ``MetricSummary`` of every metric, and the inputs."""

    models: dict[str, ModelInfo]  # role -> model
    data: dict[str, SplitInfo]  # split name -> split
    settings: EvalSettings
    results: Results  # role -> split -> metric -> summary
    requirements: list[RequirementOutcome]
    samples_sha256: str  # of the per-sample JSON Lines file
    redaction: dict[str, Any] = field(default_factory=dict)  # {"redacted": true, "redaction": scheme} or {}
    protocol: dict[str, Any] = field(default_factory=dict)  # eval --protocol: kvwctl.protocols.protocol_section
    metrics: tuple[str, ...] = METRICS
    tool_version: str = __version__

    @property
    def non_finite(self) -> list[str]:
        """``role.split.metric`` of every summary with a NaN or infinite sample value."""
        return [
            f"{role}.{split}.{metric}"
            for role, splits in self.results.items()
            for split, metrics in splits.items()
            for metric, summary in metrics.items()
            if summary.non_finite
        ]

    @property
    def failed(self) -> list[RequirementOutcome]:
        return [outcome for outcome in self.requirements if not outcome.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVAL_FORMAT,
            "tool_version": self.tool_version,
            "models": {role: model.to_json() for role, model in self.models.items()},
            "data": {name: split.to_json() for name, split in self.data.items()},
            "settings": self.settings.to_json(),
            "metrics": list(self.metrics),
            "results": {
                role: {
                    split: {metric: summary.to_json() for metric, summary in metrics.items()}
                    for split, metrics in splits.items()
                }
                for role, splits in self.results.items()
            },
            "non_finite": self.non_finite,
            "requirements": [outcome.to_json() for outcome in self.requirements],
            **({"protocol": self.protocol} if self.protocol else {}),
            "samples_sha256": self.samples_sha256,
            **self.redaction,
        }
