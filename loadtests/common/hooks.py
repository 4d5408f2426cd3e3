"""Typed registration on Locust's event hooks, whose `add_listener` is not annotated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from locust.event import EventHook

Handler = TypeVar("Handler", bound=Callable[..., Any])


def on(hook: EventHook) -> Callable[[Handler], Handler]:
    """`@on(events.quitting)`: register the decorated function, keeping its signature."""

    def register(handler: Handler) -> Handler:
        hook.add_listener(handler)  # type: ignore[no-untyped-call]
        return handler

    return register
