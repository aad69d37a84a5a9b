"""Appended JSONL results: durable per batch, a partial last line removed on reopening."""

import json

import pytest

from hydrax.offline.writer import ResultWriter


def test_append_and_resume(tmp_path):
  path = str(tmp_path / "sub" / "out.jsonl")
  w = ResultWriter(path)
  assert w.done == set()
  w.write([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
  w.write([{"id": 3}, {"id": "a", "sample": 1}])
  assert w.done == {("a", 0), ("b", 0), ("3", 0), ("a", 1)}
  assert ResultWriter(path).done == w.done
  assert [json.loads(x)["id"] for x in open(path)] == ["a", "b", 3, "a"]


def test_partial_last_line_is_removed(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
  w = ResultWriter(str(path))
  assert w.done == {("a", 0), ("b", 0)}
  assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_foreign_file_is_refused(tmp_path):
  path = tmp_path / "out.jsonl"
  for bad in ("not json", "[1]", '{"x": 1}', '{"id": "a", "sample": -1}',
              '{"id": "a", "sample": "1"}'):
    path.write_text('{"id": "a"}\n' + bad + "\n")
    with pytest.raises(ValueError, match="line 2 is not a completion record"):
      ResultWriter(str(path))
