"""Warnings a user must see are seen at PvaPy's default log level (errors only) too."""

from __future__ import annotations

import logging

from edge_ptychonn.warnings_shown import warn


def test_a_warning_goes_through_a_logger_that_shows_warnings(caplog, capsys):
    logger = logging.getLogger("shown.warnings")
    logger.setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="shown.warnings"):
        warn(logger, "cores %d of %d", 3, 2)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "cores 3 of 2")]
    assert capsys.readouterr().out == ""


def test_a_warning_is_printed_where_the_logger_shows_only_errors(caplog, capsys):
    logger = logging.getLogger("errors.only")
    logger.setLevel(logging.ERROR)
    warn(logger, "cores %d of %d", 3, 2)
    out = capsys.readouterr().out
    assert out.rstrip().endswith("errors.only WARNING: cores 3 of 2") and out.count("\n") == 1, out
    assert not caplog.records
