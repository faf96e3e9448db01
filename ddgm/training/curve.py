"""The validation curve file (train.curve_file, a DVC plot): one tab-separated row per validation
with the val -ELBO in bits/dim and its three terms, L_T (prior), sum_{t>=2} L_{t-1} (diffusion)
and L_0 (decoder). The training loop writes it; the sample stage draws it (Figure 2D)."""

from __future__ import annotations

from pathlib import Path

from ddgm.atomic import atomic_write

CURVE_COLUMNS = ("step", "val_bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd")


def curve_row(step: int, bits_per_dim: dict[str, float]) -> dict[str, float]:
    """The row of a validation at ``step`` whose bits/dim are ``bits_per_dim`` (SplitELBO.bits_per_dim)."""
    return {"step": step, "val_bpd": bits_per_dim["total"], "prior_bpd": bits_per_dim["prior"],
            "diffusion_bpd": bits_per_dim["diffusion"], "decoder_bpd": bits_per_dim["decoder"]}


def write_curve(path: str | Path, rows: list[dict[str, float]]) -> None:
    """Write the header and ``rows`` (six significant digits) atomically."""
    lines = ["\t".join(CURVE_COLUMNS)] + ["\t".join(f"{row[c]:.6g}" for c in CURVE_COLUMNS) for row in rows]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def read_curve(path: str | Path) -> list[dict[str, float]]:
    """Rows of a validation curve file (empty when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, map(float, line.split("\t")), strict=True)) for line in lines if line]
