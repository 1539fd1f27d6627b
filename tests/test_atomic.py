"""Atomic whole-file writes: the target is either the old file or the complete new one, never a part."""
import json
import os

import pytest

from dqjax import atomic


def test_write_replaces_whole_and_a_failure_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "sub" / "rows.json")
  atomic.write_json(path, {"a": 1})
  assert json.load(open(path)) == {"a": 1}

  def half_then_fail(f):
    f.write('{"a": 2, ')
    raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError, match="interrupted"):
    atomic.write(path, half_then_fail)
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path / "sub") == ["rows.json"]          # no temporary file left behind
  atomic.write_text(path, "done\n")
  assert open(path).read() == "done\n"
