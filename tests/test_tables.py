"""The CLI's tables, built from hand-made results: their titles, columns and formatted cells."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.table import Table

from kvwctl.accessor import AccessorResult
from kvwctl.method import LayerSummary
from kvwctl.tables import accessor_table, apply_table


def cells(table: Table) -> tuple[list[str], list[tuple[str, ...]]]:
    """The table's column headers and its rows of cell texts."""
    headers = [str(column.header) for column in table.columns]
    return headers, list(zip(*(column.cells for column in table.columns), strict=True))


def test_accessor_table() -> None:
    result = AccessorResult(
        path=Path("accessor.safetensors"),
        num_batches=3,
        batch_size=1,
        layers=[LayerSummary(layer=0, vectors=8, exposed=2, max_exposure=1.23456, mean_exposure=0.25)],
    )
    table = accessor_table(result)
    assert table.title == "exposure over 3 forget batches of 1"
    assert cells(table) == (["layer", "vectors", "A > 0", "max E", "mean E"], [("0", "8", "2 (25%)", "1.235", "0.25")])


def test_apply_table() -> None:
    per_layer = {2: SimpleNamespace(vectors=8, scaled=3, min_gate=0.0123456, mean_gate=0.75)}
    table = apply_table(0.02, per_layer)
    assert table.title == "gamma = 0.02"
    assert cells(table) == (
        ["layer", "vectors", "scaled", "min gate", "mean gate"],
        [("2", "8", "3", "0.01235", "0.750000")],
    )
