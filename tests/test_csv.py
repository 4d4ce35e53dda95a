"""karyo.atomic.write_csv, the one CSV writer behind every CSV karyo writes."""

import csv
import io

import pytest

from karyo.atomic import write_csv
from karyo.data.manifest import write_manifest


def test_write_csv_fields_quoting_encoding_and_line_ends(tmp_path):
    path = write_csv(tmp_path / "sub" / "t.csv",
                     [{"a": 1.5, "b": None, "c": "x,y", "extra": "dropped"}, ("é", 2, 'say "hi"')],
                     ["a", "b", "c"])
    assert path == tmp_path / "sub" / "t.csv"
    data = path.read_bytes()
    assert data == 'a,b,c\n1.5,,"x,y"\né,2,"say ""hi"""\n'.encode("utf-8")
    assert b"\r" not in data
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary file left


def test_write_csv_leaves_the_old_file_when_a_row_fails(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"a": 1}], ["a"])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-table")

    with pytest.raises(RuntimeError):
        write_csv(path, rows(), ["a"])
    assert path.read_text() == "a\n1\n"


def test_write_manifest_is_byte_identical_to_the_dictwriter_it_replaced(tmp_path):
    rows = [{"path": "a b/1.png", "label": "normal", "group": "c,1", "note": None},
            {"path": "2.png", "label": "abnormal", "group": "c2", "note": "é"}]
    write_manifest(tmp_path / "m.csv", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "label", "group", "note"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    assert (tmp_path / "m.csv").read_bytes() == buf.getvalue().encode("utf-8")
