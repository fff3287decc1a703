"""``bincount data fetch|prepare``: the data commands of the ``bincount`` CLI.

Usage:
    bincount data fetch --list file_list.json --out data/abid
    bincount data fetch --ids 1-5000 --out data/abid --workers 32
    bincount data prepare --in data/abid --out s3://BUCKET/abid/v1 --resize 256
"""

from __future__ import annotations

import argparse
import logging
import os

from bincount.data.abid import PUBLIC_BUCKET


def add_data_command(subparsers) -> None:
    """Add ``data`` with its ``fetch`` and ``prepare`` subcommands to an argparse subparsers object.

    Each leaf sets ``func(args) -> int`` (the exit code), run by :func:`bincount.errors.run_command`.
    """
    parser = subparsers.add_parser("data", help="fetch ABID from S3 and prepare streaming shards")
    commands = parser.add_subparsers(dest="data_command", metavar="{fetch,prepare}", required=True)
    _add_fetch(commands)
    _add_prepare(commands)


def _add_fetch(commands) -> None:
    p = commands.add_parser(
        "fetch", help="download ABID photos + metadata from the public bucket",
        description="Download bin-images/<id>.jpg and metadata/<id>.json from s3://aft-vbi-pds: anonymous, "
                    "parallel, retried by botocore, resumable (a rerun fetches only what is missing); "
                    "keys the bucket lacks are listed in OUT/fetch_report.json.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--list", dest="list_path", metavar="FILE",
                       help="file_list.json, abid_counting_{train,val}.json or a text file of ids")
    which.add_argument("--ids", dest="id_spec", metavar="RANGES", help="e.g. 1-5000,7 (numbers written %%05d)")
    which.add_argument("--all", dest="all_ids", action="store_true", help="every photo (lists the bucket)")
    p.add_argument("--out", required=True, help="destination folder (ABID layout)")
    p.add_argument("--per-class", type=int, metavar="N", help="at most N photos of each count (balanced set)")
    p.add_argument("--max-count", type=int, help="with --per-class: leave out counts above this")
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class draw")
    p.add_argument("--bucket", default=PUBLIC_BUCKET, help="source bucket (default %(default)s)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads (default %(default)s)")
    p.add_argument("--retry-mode", default="standard", choices=("standard", "adaptive", "legacy"),
                   help="botocore retry mode (default %(default)s)")
    p.add_argument("--max-attempts", type=int, default=8, help="botocore attempts per request (default %(default)s)")
    p.add_argument("--signed", action="store_true", help="sign requests with your credentials (private mirror)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_fetch)


def _add_prepare(commands) -> None:
    p = commands.add_parser(
        "prepare", help="validate, split and shard an ABID folder into S3 or a local folder",
        description="Decode every photo (corrupt ones are reported, not written), split by id blocks as "
                    "training does, optionally resize, write litdata chunks per split, manifest.json and eda/.",
    )
    p.add_argument("--in", dest="in_dir", required=True, help="ABID-layout folder (from `bincount data fetch`)")
    p.add_argument("--out", required=True, help="s3://BUCKET/PREFIX or a local folder")
    p.add_argument("--list", dest="label_list", help="label list selecting the photos (e.g. lists/file_list.json)")
    p.add_argument("--min-count", type=int, default=1, help="smallest count kept (default %(default)s)")
    p.add_argument("--max-count", type=int, default=5, help="largest count kept (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--block-size", type=int, default=20, help="neighbouring ids kept on one side of the split")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default %(default)s)")
    p.add_argument("--resize", type=int, metavar="PX", help="shorter side of larger photos, e.g. 256")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of resized photos")
    p.add_argument("--chunk-bytes", default="64MB", help="target chunk size (default %(default)s)")
    p.add_argument("--workers", type=int, help="optimize worker processes (default: CPU count)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--staging-dir", help="local folder for chunks before the upload (default: temp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    p.add_argument("--no-eda", action="store_true", help="skip the eda/ report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_prepare)


def _run_fetch(args: argparse.Namespace) -> int:
    from bincount.data.fetch import REPORT_NAME
    from bincount.data.selection import select_and_fetch

    _log_to_stderr()

    report = select_and_fetch(
        args.out, list_path=args.list_path, id_spec=args.id_spec, all_ids=args.all_ids,
        per_class=args.per_class, max_count=args.max_count, seed=args.seed, bucket=args.bucket,
        endpoint_url=args.endpoint_url, workers=args.workers, retry_mode=args.retry_mode,
        max_attempts=args.max_attempts, anonymous=not args.signed, progress=not args.no_progress,
    )
    print(f"{args.out}: {report.summary()}; report: {args.out}/{REPORT_NAME}")
    return 1 if any(report.failed.values()) else 0


def _run_prepare(args: argparse.Namespace) -> int:
    # When one optimize worker fails (a full disk), litdata stops the others; multiprocessing's
    # resource tracker removes the semaphores they held, and its warning about them would follow
    # the one error line. The tracker is a process of its own, started later: it reads this variable.
    filters = [os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:multiprocessing.resource_tracker"]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, filters))
    _log_to_stderr()
    from bincount.data.prepare import prepare
    from bincount.data.s3 import join_uri
    from bincount.data.shards import MANIFEST

    manifest = prepare(
        args.in_dir, args.out, min_count=args.min_count, max_count=args.max_count, label_list=args.label_list,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, block_size=args.block_size,
        seed=args.seed, resize=args.resize, quality=args.quality, chunk_bytes=args.chunk_bytes,
        num_workers=args.workers, endpoint_url=args.endpoint_url, staging_dir=args.staging_dir,
        overwrite=args.overwrite, eda=not args.no_eda, progress=not args.no_progress,
    )
    sizes = ", ".join(f"{k} {len(v['image_ids'])}" for k, v in manifest["splits"].items())
    print(f"{args.out}: {sizes} photos; {len(manifest['rejected'])} rejected; {join_uri(args.out, MANIFEST)}")
    return 0


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
