"""The ``coffea-otcal`` command line: one sub-command per pipeline stage."""

from __future__ import annotations

__all__ = ["COMMANDS", "main"]

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

#: sub-command -> (module that implements it, one-line help).  Each module defines
#: ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its
#: command runs, so ``coffea-otcal apply`` never imports torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("coffea_otcal.generator", "write a toy NanoAOD sample with known truth"),
    "fill": ("coffea_otcal.fill", "fill the control-region store from ROOT files"),
    "em": ("coffea_otcal.em_cli", "extract flavour-conditional data targets by EM"),
    "train": ("coffea_otcal.train_cli", "train flavour-factorized OT maps"),
    "latent": ("coffea_otcal.latent_cli", "calibrate a tagger latent (Mind the Gap) and report"),
    "export": ("coffea_otcal.export_cli", "write the bundle's correctionlib export"),
    "apply": ("coffea_otcal.skim", "calibrate ROOT files with a bundle and write skims"),
    "run": ("coffea_otcal.run_cli", "run the whole chain from a pipeline configuration"),
    "demo": ("coffea_otcal.demo", "generate a sample with known truth and run the whole chain"),
}


def _build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = argparse.ArgumentParser(
        prog="coffea-otcal",
        description="Optimal-transport calibration of jet-tagger outputs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, (modname, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext)
        if name == chosen:
            module = importlib.import_module(modname)
            module.add_arguments(sp)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)  # library warnings (e.g. CompositionWarning) once, as logs
    try:
        return int(module.run(args))
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        logging.getLogger("coffea_otcal").debug("error", exc_info=True)
        sys.stderr.write(f"coffea-otcal {args.command}: error: {err}\n")
        return 1
    finally:
        logging.captureWarnings(False)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
