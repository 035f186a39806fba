"""build-shards against img2dataset on remote images: the same URLs, served on loopback with added latency.

Both read 2,000 photo-like 800x600 JPEGs over HTTP from a local server that waits `--latency` before every response
(object storage's and the web's first-byte latency), resize the shorter side to 384 at JPEG quality 95 and write
WebDataset tars, with the same number of processes. img2dataset runs with its own defaults otherwise (256 download
threads per process) in its own virtual environment (benchmarks/peer_env.py); build-shards with its defaults
(32 reads in flight per worker). Each system is timed end to end as a user runs it, start-up included. Target: our
images/s at least 1.0x img2dataset's at 1 and 2 processes with latency (the median over rounds of the ratio within a
round); the figures without added latency are recorded alongside.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_build_shards import make_corpus
from benchmarks.peer_env import peer_python
from tests.faulty_proxy import LoopbackServer, QuietFileHandler

IMG2DATASET = ["img2dataset==1.47.0"]
MAX_SIDE = 384
TARGET = 1.0


class SlowHandler(QuietFileHandler):
    latency = 0.0

    def do_GET(self) -> None:
        time.sleep(self.latency)
        super().do_GET()


def serve(folder: str, latency: float, ports: multiprocessing.Queue) -> None:
    """The image server, in its own process: its threads then take no GIL from the system being measured."""
    SlowHandler.latency = latency
    with LoopbackServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=folder)) as server:
        ports.put(server.server_address[1])
        server.serve_forever()


def start_server(folder: Path, latency: float) -> tuple[multiprocessing.Process, int]:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=serve, args=(str(folder), latency, ports), daemon=True)
    process.start()
    return process, ports.get(timeout=30)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def build_shards(manifest: Path, out: Path, processes: int) -> float:
    command = [str(Path(sys.executable).parent / "build-shards"), str(manifest), "--output", str(out)]
    command += ["--no-labels", "--max-side", str(MAX_SIDE), "--quality", "95", "--workers", str(processes)]
    elapsed = timed(command)
    index = json.loads((out / "index.json").read_text())
    written = sum(split["num_samples"] for split in index["splits"].values())
    shutil.rmtree(out)
    return written / elapsed


def img2dataset(python: Path, urls: Path, out: Path, processes: int) -> float:
    command = [str(python.parent / "img2dataset"), "--url_list", str(urls), "--input_format", "txt"]
    command += ["--output_folder", str(out), "--output_format", "webdataset", "--processes_count", str(processes)]
    command += ["--image_size", str(MAX_SIDE), "--resize_mode", "keep_ratio", "--encode_quality", "95"]
    command += ["--distributor", "multiprocessing", "--enable_wandb", "False"]
    elapsed = timed(command)
    written = sum(json.loads(path.read_text())["successes"] for path in out.glob("*_stats.json"))
    shutil.rmtree(out)
    return written / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before every response")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; ratios are medians of within-round ratios")
    args = parser.parse_args(argv)
    python = peer_python("img2dataset", IMG2DATASET)
    work = Path(tempfile.mkdtemp(prefix="bench-build-remote-"))
    latencies = (args.latency, 0.0)
    rates: dict[tuple[str, float, int], list[float]] = {}
    try:
        make_corpus(work / "images", args.images, (800, 600))
        files = sorted(path.relative_to(work / "images") for path in (work / "images").rglob("*.jpg"))
        for latency in latencies:
            server, port = start_server(work / "images", latency)
            urls = [f"http://127.0.0.1:{port}/{path}" for path in files]
            (work / "urls.txt").write_text("\n".join(urls) + "\n")
            (work / "manifest.csv").write_text("url\n" + "\n".join(urls) + "\n")
            measures = {
                "build-shards": lambda p: build_shards(work / "manifest.csv", work / "ours", p),
                "img2dataset": lambda p: img2dataset(python, work / "urls.txt", work / "theirs", p),
            }
            for round_ in range(args.rounds):
                for processes in (1, 2):
                    # back to back, alternating which goes first: this machine's speed drifts over minutes
                    order = list(measures) if round_ % 2 == 0 else list(reversed(measures))
                    for name in order:
                        rate = measures[name](processes)
                        rates.setdefault((name, latency, processes), []).append(rate)
                        print(
                            f"  round {round_ + 1}, {latency * 1000:.0f} ms, {processes} process(es): "
                            f"{name} {rate:.1f} images/s",
                            flush=True,
                        )
            server.terminate()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nbuild-shards vs img2dataset: {args.images} JPEGs of 800x600 over HTTP, shorter side to {MAX_SIDE}, q95, "
        f"medians of {args.rounds} rounds"
    )
    ok = True
    for latency in latencies:
        for processes in (1, 2):
            ours, theirs = (rates[(name, latency, processes)] for name in ("build-shards", "img2dataset"))
            ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
            ratio = statistics.median(ratios)
            verdict = ""
            if latency > 0:
                ok &= ratio >= TARGET
                verdict = f" (target >= {TARGET:.2f}x): {'met' if ratio >= TARGET else 'MISSED'}"
            print(
                f"  {latency * 1000:3.0f} ms, {processes} process(es): build-shards {statistics.median(ours):6.1f}, "
                f"img2dataset {statistics.median(theirs):6.1f} images/s; {ratio:.2f}x, rounds "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + verdict
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
