import json
import logging

import pytest

from bincount.data.abid import (
    BinRecord,
    LabelError,
    build_index,
    read_label_list,
)
from bincount.data.splits import block_split, split_groups
from tests.fakes import make_fake_abid, write_bin_photo, write_metadata


def test_index_keeps_good_photos_and_reports_each_bad_one(fake_abid, caplog):
    root, made = fake_abid
    with caplog.at_level(logging.WARNING, logger="bincount"):
        records, report = build_index(root, min_count=1, max_count=5)
    assert {r.image_id: r.expected_quantity for r in records} == made["good"]
    assert report.out_of_range == {8: 1}
    assert report.skipped == {"truncated JPEG": 1, "not a JPEG": 1, "malformed metadata": 2, "no label": 1}
    for bad_id in made["bad"]:
        assert sum(bad_id in m for m in caplog.messages) == 1, bad_id
    assert "dropped 1 outside the class range" in report.summary()


def test_ids_are_strings_leading_zeros_kept(tmp_path):
    write_bin_photo(tmp_path / "bin-images" / "523.jpg", 1)
    write_metadata(tmp_path / "metadata" / "523.json", 1)
    write_bin_photo(tmp_path / "bin-images" / "00523.jpg", 4)
    write_metadata(tmp_path / "metadata" / "00523.json", 4)
    records, _ = build_index(tmp_path, min_count=0, max_count=5)
    assert sorted(records, key=lambda r: r.image_id) == [BinRecord("00523", 4), BinRecord("523", 1)]


def test_labels_csv_fills_in_missing_metadata_and_metadata_wins(tmp_path):
    for image_id in ("1", "2"):
        write_bin_photo(tmp_path / "bin-images" / f"{image_id}.jpg", 1)
    write_metadata(tmp_path / "metadata" / "1.json", 3)
    (tmp_path / "labels.csv").write_text("image_id,expected_quantity,label_source\n1,4,x\n2,2,y\n")
    records, report = build_index(tmp_path, min_count=0, max_count=5)
    assert records == [BinRecord("1", 3), BinRecord("2", 2)]
    assert report.label_conflicts == 1


def test_label_list_formats(tmp_path):
    udacity = tmp_path / "file_list.json"
    udacity.write_text(json.dumps({"1": ["data/metadata/00710.json"], "3": ["metadata/523.json"]}))
    assert read_label_list(udacity) == {"00710": 1, "523": 3}
    challenge = tmp_path / "abid_counting_train.json"
    challenge.write_text(json.dumps([[4, 4], [522, 0]]))
    assert read_label_list(challenge) == {"00005": 4, "00523": 0}
    ids = tmp_path / "ids.txt"
    ids.write_text("00001\n523\n\n")
    assert read_label_list(ids) == {"00001": -1, "523": -1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(LabelError):
        read_label_list(bad)


def test_label_list_selects_photos_and_gives_counts(tmp_path):
    made = make_fake_abid(tmp_path, n=10, bad=False)
    (tmp_path / "metadata" / "00002.json").unlink()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "file_list.json").write_text(json.dumps({"2": ["metadata/00002.json"], "3": ["x/00003.json", "x/77777.json"]}))
    records, report = build_index(tmp_path, min_count=1, max_count=5, label_list="lists/file_list.json")
    assert records == [BinRecord("00002", 2), BinRecord("00003", made["good"]["00003"])]
    assert report.skipped == {"listed but no image file": 1}


def test_no_usable_photo_names_the_folder(tmp_path):
    write_bin_photo(tmp_path / "bin-images" / "1.jpg", 9)
    write_metadata(tmp_path / "metadata" / "1.json", 9)
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_index(tmp_path, min_count=1, max_count=5)
    with pytest.raises(FileNotFoundError, match="bin-images"):
        build_index(tmp_path / "nowhere", min_count=1, max_count=5)


def _records(n: int) -> list[BinRecord]:
    return [BinRecord(f"{i:05d}", 1 + (i * 7 // 3) % 5) for i in range(n)]


def test_block_split_is_deterministic_disjoint_and_keeps_blocks_together():
    records = _records(1000)
    a = block_split(records, val_fraction=0.15, test_fraction=0.15, seed=0, block_size=10)
    b = block_split(list(reversed(records)), val_fraction=0.15, test_fraction=0.15, seed=0, block_size=10)
    assert a == b
    ids = {name: {r.image_id for r in recs} for name, recs in a.items()}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"]) and ids["val"].isdisjoint(ids["test"])
    assert set().union(*ids.values()) == {r.image_id for r in records}
    blocks = {name: set(split_groups(sorted(s), 10)) for name, s in ids.items()}
    assert blocks["train"].isdisjoint(blocks["test"]) and blocks["val"].isdisjoint(blocks["test"])
    for name in ("val", "test"):
        assert 0.10 < len(ids[name]) / 1000 < 0.20
    c = block_split(records, val_fraction=0.15, test_fraction=0.15, seed=1, block_size=10)
    assert c["test"] != a["test"]


def test_block_split_is_stratified():
    records = _records(2000)
    split = block_split(records, val_fraction=0.15, test_fraction=0.15, seed=0, block_size=10)
    share = lambda recs, k: sum(r.expected_quantity == k for r in recs) / len(recs)  # noqa: E731
    for k in range(1, 6):
        assert abs(share(split["test"], k) - share(records, k)) < 0.05


def test_too_few_id_blocks_say_which_setting_makes_more():
    with pytest.raises(ValueError, match=r"100 photos in blocks of 20 ids make 5 id blocks, too few for a 7-fold split: "
                                         r"use smaller blocks \(data\.block_size=, or --block-size"):
        block_split(_records(100), val_fraction=0.15, test_fraction=0.15, seed=0, block_size=20)
