"""Checkpoints of a long profile run, and ``--resume`` from them.

    kvwctl profile --split retain --checkpoint-every 50          # killed after batch 120
    kvwctl profile --split retain --checkpoint-every 50 --resume # continues after batch 100

With ``--checkpoint-every N`` the run writes, after every N-th batch (and on Ctrl-C or SIGTERM, with
the batches finished since), a **resume sidecar** next to its output, ``<out>.resume`` (format ``kvwctl.profile-resume/1``, written atomically): the
per-sample rows of every sample profiled so far, under the names a forget profile gives them
(``layers.N.sum`` (done, m), for experts ``layers.N.experts.sum`` (done, E, m) and ``.count``
(done, E), and ``count`` (done,)) (for a retain run too: the pooled sums are formed from them at the end, exactly as an
uninterrupted run forms them), ``sample_indices`` (done,), their positions in the length order the batches are formed in
(``modeling.length_order``), and
metadata naming the run: model fingerprint, data sha256, split, positions, batch size, dtype,
device, tool version, the shard and the samples it covers, and ``batches_done``.

``--resume`` reads the sidecar (a missing one: the run starts from the beginning), refuses it if any
of that metadata differs from the run's, naming the key and both values, and profiles only the
samples not yet done. The batches are formed from the samples alone (``profile.collect_sums``), so
the samples left after whole batches are batched as the uninterrupted run batched them, and the
profile written at the end is byte-identical to the uninterrupted run's. The sidecar is removed once
the profile is written. Without ``--resume`` an existing sidecar is refused unless ``--force``
(which starts over). The sidecar is as large as a forget profile of the samples done, and it is
rewritten whole at every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvwctl import __version__
from kvwctl.artifacts import PROFILE_RESUME_FORMAT, read_artifact, write_artifact
from kvwctl.errors import ArtifactError, KvwError
from kvwctl.outputs import check_replaceable

if TYPE_CHECKING:
    import torch

SIDECAR_SUFFIX = ".resume"
# Metadata of a sidecar that must equal the resuming run's (the rest says how far it got).
IDENTITY_KEYS = (
    "model", "model_fingerprint", "num_layers", "data_sha256", "split", "positions", "batch_size", "dtype",
    "device", "tool_version", "shard", "samples",
)  # fmt: skip


def sidecar_path(out: Path) -> Path:
    """Where a profile run writing ``out`` keeps its checkpoint."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def check_sidecar(out: Path, *, resume: bool, force: bool) -> None:
    """Before any work: an existing sidecar needs ``--resume`` (or ``--force``) and must be kvwctl's."""
    sidecar = sidecar_path(out)
    if not (sidecar.exists() or sidecar.is_symlink()):
        return
    check_replaceable(sidecar)
    if not resume and not force:
        raise KvwError(
            f"{sidecar} exists: the checkpoint of an unfinished profile run",
            hint="pass --resume to continue it, or --force to start over",
        )


def run_identity(metadata: dict[str, str], *, shard: str, samples: range) -> dict[str, str]:
    """The sidecar metadata that names a run, from the profile metadata it will write."""
    identity = {key: metadata[key] for key in IDENTITY_KEYS if key in metadata}
    identity |= {"tool_version": __version__, "shard": shard, "samples": json.dumps([samples.start, samples.stop])}
    return identity


@dataclass
class Progress:
    """The per-sample rows of the samples done so far (indices into the data file)."""

    sample_indices: list[int] = field(default_factory=list)
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per tensor name, chunks of (batch, ...)
    batches_done: int = 0


def load_progress(out: Path, identity: dict[str, str], samples: range) -> Progress:
    """The progress in ``out``'s sidecar, refused unless it belongs to this very run; none if absent."""

    sidecar = sidecar_path(out)
    if not sidecar.exists():
        return Progress()
    artifact = read_artifact(sidecar, PROFILE_RESUME_FORMAT)
    for key, value in identity.items():
        found = artifact.metadata.get(key)
        if found != value:
            raise ArtifactError(
                f"{sidecar} was written by another run: {key} is {found!r} there, {value!r} now",
                hint="resume with the same model, data and options, or pass --force without --resume to start over",
            )
    indices = artifact.tensors["sample_indices"].tolist()
    if len(set(indices)) != len(indices) or not all(index in samples for index in indices):
        raise ArtifactError(f"{sidecar}: sample_indices are repeated or outside {samples}")
    done = artifact.metadata["batches_done"]
    if not done.isdecimal():
        raise ArtifactError(f"{sidecar}: metadata batches_done is {done!r}; expected an integer")
    return Progress(
        sample_indices=indices,
        rows={name: [tensor] for name, tensor in artifact.tensors.items() if name != "sample_indices"},
        batches_done=int(done),
    )


class Checkpointer:
    """The per-batch callback of ``collect_sums``: records each batch and writes the sidecar every N.

    ``positions`` maps a position in the list of samples being profiled to its index in the data.
    """

    def __init__(
        self,
        out: Path,
        identity: dict[str, str],
        progress: Progress,
        *,
        positions: Sequence[int],
        every: int | None,
    ) -> None:
        self.path = sidecar_path(out)
        self.identity = identity
        # A copy: the resumed rows stay as they were read, for ``combine``.
        self.progress = Progress(
            sample_indices=list(progress.sample_indices),
            rows={name: list(chunks) for name, chunks in progress.rows.items()},
            batches_done=progress.batches_done,
        )
        self.positions = positions
        self.every = every
        self.saved = progress.batches_done  # the batches the sidecar on disk holds

    def __call__(self, indices: Sequence[int], rows: dict[str, torch.Tensor]) -> None:
        """One batch done: its samples' positions in the profiled list and their rows by tensor name."""
        if self.every is None:  # nothing to write: no need to keep the rows twice
            return
        progress = self.progress
        progress.sample_indices.extend(self.positions[index] for index in indices)
        for name, tensor in rows.items():
            progress.rows.setdefault(name, []).append(tensor)
        progress.batches_done += 1
        if progress.batches_done % self.every == 0:
            self.save()

    def save(self) -> None:
        """Write the sidecar (host copies of the rows so far), atomically."""
        import torch

        progress = self.progress
        tensors = {name: torch.cat(chunks).cpu() for name, chunks in progress.rows.items()}  # (done, ...)
        tensors["sample_indices"] = torch.tensor(progress.sample_indices, dtype=torch.int64)  # (done,)
        metadata = {"format": PROFILE_RESUME_FORMAT, **self.identity, "batches_done": str(progress.batches_done)}
        write_artifact(self.path, tensors, metadata)
        self.saved = progress.batches_done

    def save_unsaved(self) -> None:
        """On an interrupt: write the batches finished since the last checkpoint, if checkpointing."""
        if self.every is not None and self.progress.batches_done > self.saved:
            self.save()

    def remove(self) -> None:
        """The profile is written: its checkpoint is no longer needed."""
        self.path.unlink(missing_ok=True)


def combine(
    previous: Progress,
    positions: Sequence[int],
    new: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Rows of the resumed samples and of the new ones (None: none were left) in data order, on ``device``."""
    import torch

    if not previous.sample_indices:
        assert new is not None, "a run with nothing resumed profiles every sample"
        return new
    names = list(new) if new is not None else list(previous.rows)
    if set(names) != set(previous.rows):
        raise ArtifactError("the resume sidecar holds other tensors than this run profiles")
    indices = torch.tensor([*previous.sample_indices, *positions], dtype=torch.int64)
    order = torch.argsort(indices).to(device)  # (samples,): rows in data order
    rows = {}
    for name in names:
        chunks = [chunk.to(device) for chunk in previous.rows[name]] + ([new[name]] if new is not None else [])
        rows[name] = torch.cat(chunks)[order]  # (samples, ...)
    return rows
