"""Warnings a user must see, whatever the level PvaPy's loggers were given.

PvaPy's loggers (a processor's ``self.logger``) show only errors unless the consumer is started
with ``-ll warning`` (or ``info``, ``debug``): a warning logged through them at PvaPy's default
level goes nowhere. :func:`warn` logs it where the logger shows warnings, and otherwise prints it
as that logger's handler would (time, logger name, ``WARNING:``) on standard output, where PvaPy's
log lines and the consumers' statistics go.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")


def warn(logger: logging.Logger, message: str, *args) -> None:
    """``logger.warning(message, *args)``, seen even where ``logger`` shows only errors."""
    if logger.isEnabledFor(logging.WARNING):
        logger.warning(message, *args)
        return
    record = logger.makeRecord(logger.name, logging.WARNING, "(warning)", 0, message, args, None)
    print(_FORMAT.format(record), file=sys.stdout, flush=True)
