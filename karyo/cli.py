"""The ``karyo`` command line: it parses arguments and calls the library, nothing more.

Every command explains itself with ``--help``. A mistake in the input (a missing file, a bad
value, an unreadable image) ends with one line on standard error naming the file or value and
a non-zero exit status; ``--debug`` shows the full traceback instead.
"""

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from karyo import __version__
from karyo.errors import KaryoError

EPILOG = "Run 'karyo COMMAND --help' for the options of a command."


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must lie between 0 and 1")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _quiet_tensorflow():
    # TensorFlow's C++ start-up chatter hides the progress bars users should see.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# ---------------------------------------------------------------------------------- data


def cmd_data_import(args):
    from karyo.manifest import import_folder, read_manifest

    out = import_folder(args.folder, args.out, with_sha256=not args.no_sha256)
    manifest = read_manifest(out)
    counts = Counter(row["label"] for row in manifest.rows)
    summary = ", ".join(f"{counts[label]} {label}" for label in manifest.labels)
    print(f"wrote {out}: {len(manifest)} images ({summary})")
    return 0


def cmd_data_verify(args):
    from karyo.manifest import verify_manifest

    labels = tuple(args.labels.split(",")) if args.labels else None
    problems = verify_manifest(
        args.manifest, root=args.root, labels=labels, check_images=not args.no_decode,
        progress=not args.quiet,
    )
    for name, reason in problems:
        print(f"{name}: {reason}")
    if problems:
        print(f"{args.manifest}: {len(problems)} bad row(s)", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.manifest}: every row is sound")
    return 0


def add_data_commands(sub):
    data = sub.add_parser(
        "data", help="make, import, check and augment datasets (manifests)",
        description="Datasets are CSV manifests (path,label,group[,karyotype,sha256,split,...]) "
        "whose paths are relative to the manifest's folder.", epilog=EPILOG,
    )
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = dsub.add_parser(
        "import", help="turn class sub-folders into a manifest",
        description="Turn class sub-folders (normal/, abnormal/ or any class names) of FOLDER into "
        "a manifest with sha256 of every file. Each image becomes its own group: edit the group "
        "column if several images come from one patient.",
    )
    p.add_argument("--folder", required=True, type=Path, help="folder with one sub-folder per class")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write (inside FOLDER)")
    p.add_argument("--no-sha256", action="store_true", help="skip hashing (faster, less provable)")
    p.set_defaults(func=cmd_data_import)

    p = dsub.add_parser(
        "verify", help="check every row of a manifest",
        description="Check every row: the file exists inside the root, decodes as an image, matches "
        "its sha256 and has a known label; no duplicate paths. Prints one line per bad row and exits "
        "0 only if every row is sound.",
    )
    p.add_argument("manifest", type=Path, help="manifest CSV")
    p.add_argument("--root", type=Path, help="folder the paths are relative to (default: the manifest's)")
    p.add_argument("--labels", help="comma-separated allowed labels (default: normal,abnormal, or the "
                   "24 chromosome classes when every label is one)")
    p.add_argument("--no-decode", action="store_true",
                   help="do not decode images (existence and sha256 only)")
    p.add_argument("--quiet", action="store_true", help="print bad rows only")
    p.set_defaults(func=cmd_data_verify)
    return data


# ---------------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(
        prog="karyo",
        description="Chromosome abnormality detection on karyograms: transfer learning (VGG16, "
        "InceptionV3, ...) decides normal or abnormal, Monte Carlo Dropout says how confident, and "
        "cases below the confidence threshold (80 %) are referred to manual review.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"karyo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_commands(sub)
    return parser


def main(argv=None):
    """Entry point of the ``karyo`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    _quiet_tensorflow()
    try:
        return int(args.func(args) or 0)
    except KaryoError as exc:
        if args.debug:
            raise
        print(f"karyo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("karyo: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"karyo: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a clean message
        if args.debug:
            raise
        print(
            f"karyo: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
