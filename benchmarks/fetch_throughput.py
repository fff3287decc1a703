"""Fetch throughput (photos/s) from an S3 bucket: the thread pool of ``bincount data fetch`` vs a serial loop.

Usage:
    python benchmarks/fetch_throughput.py --root ../shared/abid --n 400 --workers 16

Starts a SeaweedFS S3 server on 127.0.0.1 (loopback only; stopped at the end) with a fake public
bucket holding ``--n`` real photos and their metadata files, then, in rounds that alternate the
two (ABBA), fetches all of them into a fresh folder with ``--workers`` threads and with one (the
serial baseline). Each photo is two anonymous GETs (``bin-images/<id>.jpg``,
``metadata/<id>.json``). The figure is photos/s; the ratio threads / serial is the median of the
per-round ratios. Results are labelled "loopback S3 (SeaweedFS on 127.0.0.1)": there is almost
no network latency to hide. Writes ``<out>/results.json`` and ``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest_s3: the SeaweedFS launcher

from results_io import LOOPBACK_S3, add_out_argument, alternate, write_results  # noqa: E402  (benchmarks/)

from bincount.data.abid import IMAGE_DIR, METADATA_DIR  # noqa: E402
from bincount.data.fetch import fetch  # noqa: E402
from tests.conftest_s3 import PUBLIC_BUCKET, start_seaweedfs, stop_seaweedfs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--n", type=int, default=400, help="photos (with a metadata file) per round")
    parser.add_argument("--workers", type=int, default=16, help="threads of the concurrent fetch")
    parser.add_argument("--rounds", type=int, default=3)
    add_out_argument(parser, "fetch_throughput")
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

        def fetch_round(round_: int, workers: int) -> float:
            out = work / f"out-{round_}-{workers}"
            report = fetch(ids, out, bucket=PUBLIC_BUCKET, endpoint_url=server.endpoint, workers=workers,
                           progress=False)
            if len(report.fetched["images"]) != len(ids):
                raise RuntimeError(f"fetched {len(report.fetched['images'])} of {len(ids)} photos: {report.summary()}")
            shutil.rmtree(out)
            return len(ids) / report.seconds

        threads, serial = f"{args.workers} threads", "serial (1 thread)"
        rates, order = alternate({threads: lambda r: fetch_round(r, args.workers), serial: lambda r: fetch_round(r, 1)},
                                 args.rounds)
    finally:
        stop_seaweedfs(server)
        shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, name="fetch_throughput", unit="photos/s", rounds=rates, order=order, setting=LOOPBACK_S3,
                  what=f"{len(ids)} photos + metadata ({megabytes:.1f} MB) from {args.root} fetched with "
                       f"`bincount data fetch`'s thread pool ({args.workers} threads) vs serially, two anonymous "
                       f"GETs per photo, from {LOOPBACK_S3}.",
                  ratios={f"{threads} / serial": (threads, serial)},
                  config={"root": str(args.root), "n": len(ids), "megabytes": megabytes, "workers": args.workers,
                          "rounds": args.rounds})


if __name__ == "__main__":
    main()
