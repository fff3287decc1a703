"""Images/s into the training step: shards in S3 vs shards in a local folder vs one S3 GET per photo.

Usage:
    python benchmarks/stream_throughput.py --root ../shared/abid --n 600
    python benchmarks/stream_throughput.py --root ../shared/abid --n 600 --no-decode    # I/O only

Starts a SeaweedFS S3 server on 127.0.0.1 (loopback only; stopped at the end), prepares the first
``--n`` labelled photos into litdata shards once, and uploads the same shards and the raw photos
to it. Then, in rounds that alternate the sources (ABBA: the order reversed every other round)
so every source sees the same machine load, it times one epoch of the train split through a
DataLoader (decode + ``CountingPresetTrain``; with ``--no-decode`` only the bytes) from: the S3
shards (a cold cache every round), the local shards, and a map-style dataset that GETs each
photo with boto3. The figure is images/s; each ratio is the median of the per-round ratios (the
goal is S3 shards >= 0.9x local shards). Results are labelled "loopback S3 (SeaweedFS on
127.0.0.1)": a real bucket is farther away. Writes ``<out>/results.json`` and
``<out>/summary.md`` (``results_io``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest_s3: the SeaweedFS launcher

from results_io import LOOPBACK_S3, add_out_argument, alternate, write_results  # noqa: E402  (benchmarks/)

from bincount.data.abid import IMAGE_DIR, build_index  # noqa: E402
from bincount.data.dataset import collate_skip_none  # noqa: E402
from bincount.data.decode import decode_rgb_bytes  # noqa: E402
from bincount.data.prepare import prepare  # noqa: E402
from bincount.data.s3 import make_client, upload_tree  # noqa: E402
from bincount.data.stream import ABIDStreamDataModule  # noqa: E402
from bincount.data.transforms import CountingPresetTrain  # noqa: E402
from tests.conftest_s3 import DATA_BUCKET, start_seaweedfs, stop_seaweedfs  # noqa: E402


class PerPhotoGet(Dataset):
    """One ``GetObject`` per photo (the pre-shard way), decoded and transformed like the shards."""

    def __init__(self, image_ids, counts, *, endpoint: str, transform, decode: bool) -> None:
        self.image_ids, self.counts = list(image_ids), list(counts)
        self.endpoint, self.transform, self.decode = endpoint, transform, decode
        self.client = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i):
        if self.client is None:  # one client per worker process
            self.client = make_client(endpoint_url=self.endpoint)
        data = self.client.get_object(Bucket=DATA_BUCKET, Key=f"raw/{self.image_ids[i]}.jpg")["Body"].read()
        if not self.decode:
            return len(data)
        return self.transform(decode_rgb_bytes(data)), self.counts[i], i


def nbytes(sample: dict) -> int:
    return len(sample["image"])


def epoch_rate(loader) -> float:
    """Images per second over one full pass of ``loader``."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/abid")
    parser.add_argument("--n", type=int, default=600, help="labelled photos to prepare (70%% become train)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--chunk-bytes", default="2MB", help="small enough that the photos span several chunks")
    parser.add_argument("--no-decode", action="store_true", help="time the bytes only (I/O, no JPEG decoding)")
    add_out_argument(parser, "stream_throughput")
    args = parser.parse_args()
    decode = not args.no_decode
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # per-round split sizes

    work = Path(tempfile.mkdtemp(prefix="bincount-bench-"))
    try:
        records, _ = build_index(args.root, min_count=0, max_count=10_000)
        (work / "ids.txt").write_text("\n".join(r.image_id for r in records[: args.n]) + "\n")
        manifest = prepare(args.root, str(work / "shards"), min_count=0, max_count=10_000,
                           label_list=str(work / "ids.txt"), chunk_bytes=args.chunk_bytes, eda=False, progress=False)
    except BaseException:  # e.g. too few photos for the block split: leave no shards behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    train_ids, train_counts = manifest["splits"]["train"]["image_ids"], manifest["splits"]["train"]["counts"]

    server = start_seaweedfs(work / "seaweedfs")
    try:
        os.environ.update(server.env())  # boto3 and litdata (and their worker processes) use it
        client = server.client()
        uri = f"s3://{DATA_BUCKET}/bench/v1"
        upload_tree(work / "shards", uri, client=client, progress=False, last=["manifest.json"])
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.upload_file(str(Path(args.root, IMAGE_DIR, f"{i}.jpg")), DATA_BUCKET,
                                                        f"raw/{i}.jpg"), train_ids))

        def shards(source: str, round_: int, tag: str):
            dm = ABIDStreamDataModule(source, min_count=0, max_count=10_000, image_size=args.image_size,
                                      batch_size=args.batch_size, num_workers=args.num_workers,
                                      cache_dir=str(work / f"cache-{tag}-{round_}"))  # cold: never shared
            dm.setup("fit")
            if not decode:
                dm.datasets["train"].transform = nbytes
            return dm.train_dataloader()

        def per_photo(_round: int):
            preset = CountingPresetTrain(image_size=args.image_size)
            dataset = PerPhotoGet(train_ids, train_counts, endpoint=server.endpoint, transform=preset, decode=decode)
            return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                              collate_fn=collate_skip_none if decode else None)

        s3, local, gets = "S3 shards (cold cache)", "local shards", "per-photo GETs (boto3)"
        sources = {
            s3: lambda r: shards(uri, r, "s3"),
            local: lambda r: shards(str(work / "shards"), r, "local"),
            gets: per_photo,
        }
        torch.set_num_threads(1)
        rates, order = alternate({name: (lambda r, make=make: epoch_rate(make(r))) for name, make in sources.items()},
                                 args.rounds)
    finally:
        stop_seaweedfs(server)
        shutil.rmtree(work, ignore_errors=True)
    what = f"decode + CountingPresetTrain({args.image_size})" if decode else "bytes only (no decoding)"
    chunks = manifest["shards"]["train"]["chunks"]
    write_results(args.out, name="stream_throughput", unit="images/s", rounds=rates, order=order, setting=LOOPBACK_S3,
                  what=f"One epoch of {len(train_ids)} train photos from {args.root} ({chunks} chunks of "
                       f"{args.chunk_bytes}) into the training step, {what}, batch {args.batch_size}, "
                       f"{args.num_workers} workers: litdata shards in {LOOPBACK_S3} vs the same shards in a local "
                       "folder vs one boto3 GET per photo. Goal: S3 shards >= 0.9x local shards.",
                  ratios={"S3 shards / local shards": (s3, local), "S3 shards / per-photo GETs": (s3, gets)},
                  config={"root": str(args.root), "n": args.n, "train_photos": len(train_ids), "chunks": chunks,
                          "chunk_bytes": args.chunk_bytes, "image_size": args.image_size,
                          "batch_size": args.batch_size, "num_workers": args.num_workers, "decode": decode,
                          "rounds": args.rounds})


if __name__ == "__main__":
    main()
