"""The one reader of record files (rblora.utils.records)."""

import json

import pytest

from rblora.utils.records import parse_records, read_records


def test_unicode_line_breaks_inside_strings_stay_in_their_record(tmp_path):
    # JSON allows U+2028, U+0085 and U+001C unescaped in strings; only "\n" ends a JSON line.
    records = [{"q": "a\u2028b"}, {"q": "c\x85d\x1ce"}, {"q": "plain"}]
    path = tmp_path / "r.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode() + b"\n")
    assert [value for _, value in read_records(path)] == records
    assert [line for line, _ in read_records(path)] == [1, 2, 3]


def test_crlf_lines_and_blank_lines(tmp_path):
    raw = b'{"a": 1}\r\n\r\n{"a": 2}\r\n'
    assert parse_records(raw, "x.jsonl") == [(1, {"a": 1}), (3, {"a": 2})]


def test_array_and_errors_name_file_and_line():
    assert parse_records(b'[\n{"a": 1},\n{"a": 2}\n]', "x.json") == [(2, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        parse_records(b'{"a": 1}\n{"a": \n', "x.jsonl")
    assert parse_records(b'{"a": 1}\n{"a": ', "x.jsonl", stop_at_error=True) == [(1, {"a": 1})]
    with pytest.raises(ValueError, match="the file is empty"):
        parse_records(b"  \n", "x.jsonl")
