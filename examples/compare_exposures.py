"""Compare two exposure files (accessor format) layer by layer.

    python examples/compare_exposures.py kvw-run/accessor.safetensors kvw-run/unlearned.exposure.safetensors

Prints, per layer, the max relative difference |E_b - E_a| / max(|E_a|, tiny) over vectors with
E_a > 0, the max absolute difference, and how many vectors are exposed (E > 0) in each file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvwctl.artifacts import ACCESSOR_FORMAT, read_artifact


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    first, second = (read_artifact(Path(path), ACCESSOR_FORMAT) for path in sys.argv[1:])
    print(f"{'layer':>5} {'max rel diff':>13} {'max abs diff':>13} {'E>0 (a)':>8} {'E>0 (b)':>8}")
    for layer in range(first.num_layers):
        a, b = first.layer_tensor(layer, "exposure").double(), second.layer_tensor(layer, "exposure").double()
        exposed = a > 0
        relative = ((b - a).abs()[exposed] / a[exposed]).max().item() if exposed.any() else 0.0
        print(
            f"{layer:>5} {relative:>13.3e} {(b - a).abs().max().item():>13.3e} {int(exposed.sum()):>8} {int((b > 0).sum()):>8}"
        )


if __name__ == "__main__":
    main()
