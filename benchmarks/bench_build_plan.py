"""build-shards planning memory: a manifest of 1M and of 10M rows cut into 1,000 parts, building part 0 only.

Every part reads the whole manifest twice (the census, then its own slice of the plan), so its memory must not grow
with the corpus: the target is a peak resident set of at most 1.5 GB at 10M rows, and about the same at 1M and 10M
(the class table of 1,000 names is the only thing that scales with the corpus, and it stops at 1,000). The manifests
are synthetic Parquet files of paths and labels, no images: the rows of part 0 name files that do not exist and are
counted as unreadable, so what is measured is planning, not encoding.

    python -m benchmarks.bench_build_plan [--rows 1000000 10000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PARTS = 1000
SAMPLES_PER_SHARD = 1000
"""10M rows make 10,000 shards, 10 per part; 1M rows 1 per part."""
CLASSES = 1000
TARGET_BYTES = 1.5e9


def write_manifest(path: Path, rows: int) -> None:
    """Paths under a folder that does not exist, and 1,000 class names, in Parquet row groups of 1M rows."""
    writer = None
    for start in range(0, rows, 1_000_000):
        numbers = range(start, min(rows, start + 1_000_000))
        table = pa.table(
            {
                "path": [f"/nonexistent/corpus/{n % 4096:04x}/{n:010d}.jpg" for n in numbers],
                "label": [f"class{n % CLASSES:04d}" for n in numbers],
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def plan_part_zero(manifest: Path, output: Path) -> tuple[float, int]:
    """Seconds and peak resident bytes of `build-shards --num-parts 1000 --part 0` on the manifest, in a fresh
    process."""
    command = [
        sys.executable,
        "-m",
        "data_pipeline.build.cli",
        str(manifest),
        "--output",
        str(output),
        "--num-parts",
        str(PARTS),
        "--part",
        "0",
        "--max-samples-per-shard",
        str(SAMPLES_PER_SHARD),
        "--workers",
        "0",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build-shards failed on {manifest} (exit {os.waitstatus_to_exitcode(status)})")
    return seconds, usage.ru_maxrss * 1024  # kilobytes on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args(argv)
    peaks = {}
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.rows:
            manifest = Path(folder) / f"m{rows}.parquet"
            write_manifest(manifest, rows)
            seconds, peak = plan_part_zero(manifest, Path(folder) / f"out{rows}")
            peaks[rows] = peak
            print(
                f"{rows:>11,} rows, part 0 of {PARTS}: {seconds:7.1f} s ({rows / seconds / 1e6:.2f}M rows/s over two "
                f"passes), peak RSS {peak / 1e9:.2f} GB (target <= {TARGET_BYTES / 1e9:.1f} GB)"
            )
    smallest, largest = min(peaks), max(peaks)
    print(f"peak RSS {largest:,} rows / {smallest:,} rows: {peaks[largest] / peaks[smallest]:.2f}x (target: about 1)")
    return 0 if max(peaks.values()) <= TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
