"""`hat --log-format json`: every line is one JSON object with the standard keys and the event's own fields."""
from __future__ import annotations

import json
import logging

from hat.cli.log_format import JsonFormatter


def _format(message, *args, exc_info=None, **extra) -> dict:
    record = logging.LogRecord("hat.cloud", logging.INFO, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    line = JsonFormatter().format(record)
    assert "\n" not in line or "exception" in json.loads(line)
    return json.loads(line)


def test_a_record_becomes_one_json_object_with_its_extra_fields():
    """Message arguments are applied; extra fields (session, code) become keys; the time is UTC ISO 8601."""
    entry = _format("refused %s from session %r", "BAD_POSITION", "ab12", session="ab12", code="BAD_POSITION")
    assert entry["message"] == "refused BAD_POSITION from session 'ab12'"
    assert (entry["level"], entry["logger"], entry["session"], entry["code"]) == ("INFO", "hat.cloud", "ab12",
                                                                                  "BAD_POSITION")
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "args" not in entry and "msg" not in entry  # the record's own attributes stay out


def test_an_exception_is_kept_and_odd_values_do_not_break_the_line():
    """A traceback goes into `exception`; a value JSON cannot hold is written as its str()."""
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        entry = _format("forward failed", exc_info=sys.exc_info(), owner=b"\x01\x02")
    assert "ValueError: boom" in entry["exception"]
    assert entry["owner"] == str(b"\x01\x02")
