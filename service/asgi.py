"""The ASGI entry point gunicorn loads: `service.asgi:app`."""

from service.app import create_app

app = create_app()
