"""build-shards: turn an image folder or a manifest into WebDataset tar shards, locally or on s3://.

Exit codes are listed in EPILOG (the end of --help).
"""

from __future__ import annotations

import argparse
import signal
import sys

from data_pipeline.build.builder import BuildOptions, BuildResult, BuildStopped, build, finalize
from data_pipeline.build.images import ImageOptions
from data_pipeline.commands import add_storage_option, help_description, reports_user_errors, storage_options

EPILOG = """\
input:
  An image-folder tree (the label of an image is the first-level folder it is in; deeper folders belong to that
  class; files that are not images are ignored and counted), or a manifest (.csv, .tsv, .jsonl, .parquet) with a
  path-or-URL column and a label column (a class name, an integer, or a list for multi-label: a JSON list in CSV
  cells). Other manifest columns are kept as metadata. Paths and URLs may be local, s3://, http(s)://, anything
  fsspec opens; relative paths in a manifest are relative to the manifest.

output:
  {split}-{000000}.tar shards; each sample is {key}.jpg, {key}.cls (single-label) and {key}.json (labels, source,
  original width and height, metadata). classes.json, errors.jsonl (one line per skipped sample) and index.json
  (shards with sample counts, bytes and sha256; totals per split and class; options; written last).

Re-running the same command after an interruption (even SIGKILL) keeps the committed shards and finishes the
job; the result is byte-identical to an uninterrupted run.

exit codes:
  0 done; 1 done, but more samples were skipped than --max-error-fraction allows; 2 bad arguments, missing input
  or unwritable output (found before any work starts); 3 stopped part-way (a worker process died, or a shard could
  not be committed): the committed shards are kept and the same command continues.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="build-shards",
        description=help_description(__doc__),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="image-folder tree or manifest file (local path or URL)")
    parser.add_argument("--output", required=True, help="output folder: a local path or s3://bucket/prefix")
    add_storage_option(parser, "s3:// and other remote URLs")
    parser.add_argument(
        "--max-samples-per-shard",
        type=int,
        default=10_000,
        help="input rows per shard: shard n of a split holds the samples of its rows n*M to (n+1)*M-1 in the build "
        "order (fewer when rows are skipped); pick M for the shard size you want, e.g. 5000 x 100 KB = 500 MB "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of samples in the 'val' split, chosen by a hash of each key so it never changes "
        "between runs (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the input shuffle before sharding")
    parser.add_argument(
        "--max-side",
        type=int,
        default=512,
        help="shorter side of stored images at most this many pixels; never upscaled (default: %(default)s)",
    )
    parser.add_argument(
        "--max-source-bytes",
        type=int,
        default=256 << 20,
        help="skip (as too_large) source files larger than this, without reading them whole (default: %(default)s)",
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    parser.add_argument(
        "--no-reencode",
        action="store_true",
        help="keep the original bytes of valid RGB JPEGs that need no rotation or resizing",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=89_478_485,
        help="skip images with more pixels than this, as decompression bombs (default: %(default)s)",
    )
    parser.add_argument(
        "--path-column",
        help="manifest column with the path or URL (default: the first of path, "
        "url, image, image_path, file, filepath)",
    )
    parser.add_argument("--label-column", default="label", help="manifest column with the label (default: label)")
    parser.add_argument("--no-labels", action="store_true", help="unlabelled corpus: store images and metadata only")
    parser.add_argument(
        "--classes",
        help="class table to use (JSON object name->index, JSON list or text file, one "
        "name per line); labels outside it are skipped as unknown_label",
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (0: encode in this process)")
    parser.add_argument(
        "--reads-in-flight",
        type=int,
        default=32,
        help="remote sources (s3://, http(s)://) each worker reads and encodes at once, on threads; raise it for "
        "slow servers (the web: hundreds of ms per image); local files are read one at a time (default: %(default)s)",
    )
    parser.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.01,
        help="exit 1 if more than this share of the input rows was skipped (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="re-read only the rows in errors.jsonl of a finished build that failed to read or decode, and add "
        "what now works",
    )
    parts = parser.add_argument_group(
        "many machines, one dataset",
        "Run the same command with --part 0 .. N-1 (anywhere, in any order, side by side; each resumes on its own), "
        "then once with --finalize: the result is byte-identical to a one-machine build.",
    )
    parts.add_argument("--num-parts", type=int, default=1, help="cut the build into N parts (default: %(default)s)")
    parts.add_argument("--part", type=int, help="build part K (0 to N-1): a contiguous run of every split's shards")
    parts.add_argument(
        "--finalize",
        action="store_true",
        help="after all N parts: check they are complete and built with these options, then write index.json, "
        "classes.json and errors.jsonl",
    )
    args = parser.parse_args(argv)
    for name in ("max_samples_per_shard", "max_side", "max_pixels", "max_source_bytes", "num_parts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in [1, 100]")
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    if args.reads_in_flight < 1:
        parser.error("--reads-in-flight must be at least 1")
    if args.num_parts > 1 and (args.part is None) == (not args.finalize):
        parser.error(f"--num-parts {args.num_parts} needs either --part K (0 to {args.num_parts - 1}) or --finalize")
    if args.num_parts == 1 and (args.part is not None or args.finalize):
        parser.error("--part and --finalize need --num-parts N (more than 1)")
    if args.part is not None and not 0 <= args.part < args.num_parts:
        parser.error(f"--part must be in [0, {args.num_parts - 1}]")
    if args.retry_failed and args.num_parts > 1:
        parser.error("--retry-failed works on the finished build: drop --num-parts, --part and --finalize")
    return args


def options_from(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        input=args.input,
        output=args.output.rstrip("/"),
        max_samples_per_shard=args.max_samples_per_shard,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image=ImageOptions(
            max_side=args.max_side, quality=args.quality, max_pixels=args.max_pixels, reencode=not args.no_reencode
        ),
        classes=args.classes,
        path_column=args.path_column,
        label_column=args.label_column,
        no_labels=args.no_labels,
        workers=args.workers,
        storage_options=storage_options(args),
        max_source_bytes=args.max_source_bytes,
        reads_in_flight=args.reads_in_flight,
        num_parts=args.num_parts,
        part=args.part or 0,
    )


def summary(result: BuildResult, options: BuildOptions) -> str:
    index = result.index
    if index is None:
        rate = result.written_samples / max(result.elapsed, 1e-9)
        return (
            f"part {options.part} of {options.num_parts} done: wrote {result.written_samples} samples in "
            f"{result.elapsed:.1f} s ({rate:.1f} images/s); run --finalize once every part is done"
        )
    if result.already_complete:
        return f"already complete: {len(index.shards)} shards; nothing to do"
    splits = (
        ", ".join(
            f"{name}: {totals.num_samples} samples in {totals.num_shards} shards"
            for name, totals in index.splits.items()
        )
        or "no samples"
    )
    skipped = ", ".join(f"{reason} {count}" for reason, count in index.skipped.items()) or "none"
    rate = result.written_samples / max(result.elapsed, 1e-9)
    wrote = f"; wrote {result.written_samples} samples in {result.elapsed:.1f} s ({rate:.1f} images/s)"
    return (
        f"{splits}; skipped {result.skipped} of {index.input_rows} rows ({skipped}); ignored "
        f"{index.ignored_files} non-image files{wrote if result.written_samples else ''}"
    )


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a scheduler's stop) ends the build through its clean-up, as Ctrl-C does; Python's default ends it at
    # once, which left a temporary shard behind
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    options = options_from(args)
    try:
        result = finalize(options) if args.finalize else build(options, retry_failed=args.retry_failed)
    except BuildStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(summary(result, options))
    if result.skipped_fraction > args.max_error_fraction:
        print(
            f"build-shards: skipped {result.skipped_fraction:.2%} of the input, more than --max-error-fraction "
            f"{args.max_error_fraction:.2%}; see {args.output.rstrip('/')}/errors.jsonl",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
