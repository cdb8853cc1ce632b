"""The ``coffea-otcal train`` command: per-flavour OT maps from a source / target file pair."""

from __future__ import annotations

__all__ = ["MAPS_FORMAT", "add_arguments", "load_table", "run", "train_maps"]

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: ``format`` tag of the file written by ``coffea-otcal train``.
MAPS_FORMAT = "coffea-otcal.fitted-maps"


def load_table(path: Path | str) -> dict[str, np.ndarray]:
    """Columns of a ``.npz`` or ``.parquet`` file as 1-d numpy arrays.

    Arguments:
        path: the file.

    Returns:
        Column name -> array.
    """
    p = Path(path)
    if not p.is_file():
        msg = f"input file {p} not found"
        raise FileNotFoundError(msg)
    if p.suffix == ".npz":
        with np.load(p) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    if p.suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        return {name: table.column(name).to_numpy() for name in table.column_names}
    msg = f"input file {p} has suffix {p.suffix!r}; use .npz or .parquet"
    raise ValueError(msg)


def _stack(table: dict[str, np.ndarray], columns: Sequence[str], path: str) -> np.ndarray:
    missing = [c for c in columns if c not in table]
    if missing:
        msg = f"columns {missing} not found in {path}; available: {sorted(table)}"
        raise KeyError(msg)
    return np.stack([np.asarray(table[c], dtype=np.float64) for c in columns], axis=1)


def train_maps(
    source: dict[str, np.ndarray],
    target: dict[str, np.ndarray],
    *,
    columns: Sequence[str],
    context_columns: Sequence[str] = (),
    flavour_column: str | None = None,
    weight_column: str | None = None,
    ilr: bool = False,
    config: Any = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | str | None = None,
    names: tuple[str, str] = ("source", "target"),
) -> dict[str, Any]:
    """Train one map per flavour value (or one map ``"all"``) and return the maps file dict.

    Arguments:
        source: source columns (e.g. MC jets).
        target: target columns (e.g. data targets per flavour).
        columns: transported columns (ILR coordinates, or probabilities with ``ilr=True``).
        context_columns: context columns (e.g. log pT, |eta|); empty for an ICNN.
        flavour_column: column splitting both files into flavours, or None.
        weight_column: per-row weight column (present in both files), or None.
        ilr: convert ``columns`` (class probabilities) to ILR coordinates first.
        config: :class:`~coffea_otcal.ot.OTConfig` or None.
        device: torch device (``"auto"``).
        seed: training seed.
        progress: progress bars.
        checkpoint_dir: checkpoint folder (resumes).
        names: labels of the two inputs for error messages.

    Returns:
        ``{"format", "version", "columns", "context_columns", "ilr", "maps": {flavour: export}}``.
    """
    from coffea_otcal.ot import fit_ot_map

    xs, xt = _stack(source, columns, names[0]), _stack(target, columns, names[1])
    if ilr:
        from coffea_otcal.geometry import ilr as to_ilr

        xs, xt = np.asarray(to_ilr(xs)), np.asarray(to_ilr(xt))
    cs = _stack(source, context_columns, names[0]) if context_columns else None
    ct = _stack(target, context_columns, names[1]) if context_columns else None
    ws = _stack(source, [weight_column], names[0])[:, 0] if weight_column else None
    wt = _stack(target, [weight_column], names[1])[:, 0] if weight_column else None
    if flavour_column is None:
        groups = {"all": (np.ones(len(xs), bool), np.ones(len(xt), bool))}
    else:
        fs = _stack(source, [flavour_column], names[0])[:, 0]
        ft = _stack(target, [flavour_column], names[1])[:, 0]
        groups = {}
        for value in np.unique(fs):
            label = str(int(value)) if float(value).is_integer() else str(value)
            groups[label] = (fs == value, ft == value)
            if not np.any(ft == value):
                msg = (
                    f"flavour {label!r}: {int(np.sum(fs == value))} source rows but no target "
                    f"rows in {names[1]} (column {flavour_column!r})"
                )
                raise ValueError(msg)
    maps = {}
    for label, (ms, mt) in groups.items():
        logger.info("training map %r: %d source, %d target rows", label, ms.sum(), mt.sum())
        fm = fit_ot_map(
            xs[ms],
            xt[mt],
            source_context=None if cs is None else cs[ms],
            target_context=None if ct is None else ct[mt],
            source_weight=None if ws is None else ws[ms],
            target_weight=None if wt is None else wt[mt],
            config=config,
            device=device,
            seed=seed,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            name=label,
        )
        maps[label] = fm.export()
    return {
        "format": MAPS_FORMAT,
        "version": 1,
        "columns": list(columns),
        "context_columns": list(context_columns),
        "ilr": ilr,
        "maps": maps,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``train`` options."""
    parser.add_argument("--source", required=True, help="source .npz/.parquet (e.g. MC jets)")
    parser.add_argument("--target", required=True, help="target .npz/.parquet (e.g. data targets)")
    parser.add_argument("--columns", nargs="+", required=True, help="transported columns")
    parser.add_argument("--context-columns", nargs="*", default=[], help="context columns")
    parser.add_argument("--flavour-column", default=None, help="one map per value of this column")
    parser.add_argument("--weight-column", default=None, help="per-row weights (both files)")
    parser.add_argument("--ilr", action="store_true", help="columns are probabilities: use ILR")
    parser.add_argument("--config", default=None, help="JSON file with OTConfig fields")
    parser.add_argument("--steps", type=int, default=None, help="override OTConfig.steps")
    parser.add_argument("--method", choices=["conjugate", "minimax"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-o", "--output", required=True, help="output JSON with the fitted maps")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal train``; returns the exit code."""
    from coffea_otcal.ot import OTConfig

    fields: dict[str, Any] = {}
    if args.config:
        fields = json.loads(Path(args.config).read_text(encoding="utf-8"))
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.method is not None:
        fields["method"] = args.method
    config = OTConfig(**fields)
    result = train_maps(
        load_table(args.source),
        load_table(args.target),
        columns=args.columns,
        context_columns=args.context_columns,
        flavour_column=args.flavour_column,
        weight_column=args.weight_column,
        ilr=args.ilr,
        config=config,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint_dir=args.checkpoint_dir,
        names=(str(args.source), str(args.target)),
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result), encoding="utf-8")
    logger.info("wrote %d maps to %s", len(result["maps"]), out)
    return 0
