"""`python -m data.prepare captions --parquet ... --images DIR`: caption tables (img2dataset's per-shard
parquet: key, caption, status) + an image folder -> the image-caption ArrayRecord file; failed downloads
skipped and counted; a row without its image, an empty caption, a missing column name the file and row."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import prepare
from lafs_jax.input import captions, images as image_lib
from lafs_jax.input.sources import DataSourceError


def _table(path, keys, caps, status=None):
    cols = {"key": keys, "caption": caps, "url": [f"http://x/{k}" for k in keys]}
    if status is not None:
        cols["status"] = status
    pq.write_table(pa.table(cols), path)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for shard, key in (("00000", "000000000"), ("00000", "000000001"), ("00001", "000010000")):
        (tmp_path / "img" / shard).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        (tmp_path / "img" / shard / f"{key}.png").write_bytes(image_lib.encode_image(image, "PNG"))
    return tmp_path


def test_parquet_and_image_folder_become_pairs(folder, capsys):
    _table(folder / "00000.parquet", ["000000000", "000000001", "000000002"],
           ["a smiling face", "a face with glasses ", "never downloaded"], ["success", "success", "failed_to_download"])
    _table(folder / "00001.parquet", ["000010000"], ["a bearded man"], ["success"])
    out = folder / "pairs.arrayrecord"
    assert prepare.main(["captions", "--parquet", str(folder / "*.parquet"), "--images", str(folder / "img"),
                         "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_pairs"] == 3 and report["skipped_rows"] == 1
    src = captions.ImageCaptionSource(str(out))
    assert [src[i]["caption"] for i in range(3)] == ["a smiling face", "a face with glasses", "a bearded man"]
    assert src[2]["image"].shape == (8, 8, 3)


@pytest.mark.parametrize("keys, caps, column, message", [
    (["000000000", "000000007"], ["a face", "a face"], "caption",
     r"00000\.parquet: row 1 \(key '000000007'\): no image"),
    (["000000000", "000000001"], ["a face", "  "], "caption", r"row 1 \(key '000000001'\) has an empty caption"),
    (["000000000"], ["a face"], "TEXT", r"no column 'TEXT'"),
])
def test_bad_rows_name_the_file_and_row(folder, keys, caps, column, message):
    _table(folder / "00000.parquet", keys, caps)
    with pytest.raises(DataSourceError, match=message):
        prepare.main(["captions", "--parquet", str(folder / "00000.parquet"), "--images", str(folder / "img"),
                      "--caption-column", column, "--out", str(folder / "bad.arrayrecord")])
