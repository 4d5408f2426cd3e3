"""How a replica logs: readable text, or one JSON object per line (LOG_FORMAT=json).

One `logging` configuration for gunicorn's own loggers, uvicorn's and the service's
(gunicorn loads it as `logconfig_dict`), so every line a replica writes has the same
shape. Each record names the request it is about (`request_id`, from service/context.py;
"-" for lines about no request), so an operator goes from a client's problem body or a
slow request straight to its lines. JSON lines come from python-json-logger; the fields
a line carries as `extra` (the access line's route, status, duration, queue and db time)
become members of its object.
"""

from __future__ import annotations

import logging
from typing import Any

from service.context import current_id
from service.settings import Settings

TEXT = "%(asctime)s %(process)d %(levelname)s %(name)s [%(request_id)s]: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "process", "request_id", "message")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the request being handled, or "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_id() or "-"
        return True


def formatter(settings: Settings) -> dict[str, Any]:
    """The `formatters` entry of a dictConfig for LOG_FORMAT."""
    if settings.log_format == "json":
        return {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": list(JSON_FIELDS),
            "rename_fields": {
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "process": "pid",
            },
            "static_fields": {"replica": settings.replica_name},
        }
    return {"format": TEXT}


def logconfig(settings: Settings) -> dict[str, Any]:
    """The dictConfig of a replica: one handler on stderr, every logger through it."""
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request": {"()": RequestIdFilter}},
        "formatters": {"line": formatter(settings)},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "filters": ["request"],
            },
        },
        "root": {"handlers": ["console"], "level": "WARNING"},
        "loggers": {
            "gunicorn.error": {"level": level, "propagate": True},
            "gunicorn.access": {"level": "INFO", "propagate": True},
            "uvicorn.error": {"level": level, "propagate": True},
            "service": {"level": level, "propagate": True},
            "psycopg.pool": {"level": "WARNING", "propagate": True},
        },
    }
