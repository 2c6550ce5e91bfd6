"""The small CSV/Parquet tables read beside the data (taxonomies, pairs)."""

from __future__ import annotations

import pandas as pd
import pytest

from bigcat._io.tables import read_table
from bigcat.errors import BigcatInputError, InputNotFoundError


def test_csv_parquet_and_frames_read_as_written(tmp_path) -> None:
    frame = pd.DataFrame({"cluster": ["a", "b"], "subclass": ["s", "s"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.csv"), frame)
    pd.testing.assert_frame_equal(read_table(str(tmp_path / "t.parquet")), frame)
    assert read_table(frame) is frame


def test_missing_and_unreadable_tables_are_one_line(tmp_path) -> None:
    with pytest.raises(InputNotFoundError, match=r"nope\.csv: no such file"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BigcatInputError, match=r"bad\.parquet: not a readable CSV/Parquet taxonomy table") as info:
        read_table(tmp_path / "bad.parquet", what="taxonomy table")
    assert "\n" not in str(info.value)
