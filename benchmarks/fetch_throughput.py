"""Fetch throughput (photos/s) from an S3 bucket: the thread pool of ``bincount data fetch`` vs a serial loop.

Usage:
    python benchmarks/fetch_throughput.py --root ../shared/abid --n 400 --workers 16

Starts a SeaweedFS S3 server on 127.0.0.1 (loopback only; stopped at the end) with a fake public
bucket holding ``--n`` real photos and their metadata files, then, in alternating rounds, fetches
all of them into a fresh folder with ``--workers`` threads and with one (the serial baseline).
Each photo is two anonymous GETs (``bin-images/<id>.jpg``, ``metadata/<id>.json``). Prints
photos/s (median of rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest_s3: the SeaweedFS launcher

from bincount.data.abid import IMAGE_DIR, METADATA_DIR  # noqa: E402
from bincount.data.fetch import fetch  # noqa: E402
from tests.conftest_s3 import PUBLIC_BUCKET, start_seaweedfs, stop_seaweedfs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--n", type=int, default=400, help="photos (with a metadata file) per round")
    parser.add_argument("--workers", type=int, default=16, help="threads of the concurrent fetch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("bincount").setLevel(logging.WARNING)

    root = Path(args.root)
    ids = sorted(p.stem for p in (root / METADATA_DIR).glob("*.json") if (root / IMAGE_DIR / f"{p.stem}.jpg").exists())
    ids = ids[: args.n]
    work = Path(tempfile.mkdtemp(prefix="bincount-fetch-bench-"))
    server = start_seaweedfs(work / "seaweedfs")
    try:
        client = server.client()
        uploads = [(root / folder / f"{i}{suffix}", f"{folder}/{i}{suffix}")
                   for i in ids for folder, suffix in ((IMAGE_DIR, ".jpg"), (METADATA_DIR, ".json"))]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda a: client.upload_file(str(a[0]), PUBLIC_BUCKET, a[1]), uploads))
        megabytes = sum(p.stat().st_size for p, _ in uploads) / 1e6

        modes = {f"{args.workers} threads": args.workers, "serial (1 thread)": 1}
        rates: dict[str, list[float]] = {name: [] for name in modes}
        for round_ in range(args.rounds):
            for name, workers in modes.items():
                out = work / f"out-{round_}-{workers}"
                report = fetch(ids, out, bucket=PUBLIC_BUCKET, endpoint_url=server.endpoint, workers=workers,
                               progress=False)
                assert len(report.fetched["images"]) == len(ids), report.summary()
                rates[name].append(len(ids) / report.seconds)
                shutil.rmtree(out)
    finally:
        stop_seaweedfs(server)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(ids)} photos + metadata ({megabytes:.1f} MB) from {args.root}, anonymous GETs from SeaweedFS "
          f"on loopback, median of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.1f} photos/s   (rounds: {', '.join(f'{x:.0f}' for x in rates[k])})")
    concurrent, serial = med.values()
    print(f"  ratio {args.workers} threads / serial: {concurrent / serial:.2f}x")


if __name__ == "__main__":
    main()
