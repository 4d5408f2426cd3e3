"""gunicorn configuration: `gunicorn -c python:service.gunicorn_conf service.asgi:app`.

Worker count, bind address and timeouts come from the same Settings as the app.
"""

from service.settings import get_settings

_settings = get_settings()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "uvicorn_worker.UvicornWorker"  # `uvicorn.workers` is deprecated
graceful_timeout = _settings.graceful_timeout
timeout = max(30, int(_settings.db_deadline * 3))  # a worker silent this long is restarted
keepalive = 5
proc_name = f"pgscale-{_settings.replica_name}"
accesslog = None  # one line per request costs more than it tells at this scale
errorlog = "-"
loglevel = _settings.log_level

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level.upper(), "propagate": True},
        "gunicorn.access": {"level": "INFO", "propagate": True},
        "uvicorn.error": {"level": _settings.log_level.upper(), "propagate": True},
        "service": {"level": _settings.log_level.upper(), "propagate": True},
        "psycopg.pool": {"level": "WARNING", "propagate": True},
    },
}
