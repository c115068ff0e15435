"""``engine.consoles``: console tokens for instances' VNC servers, issued and checked."""

from __future__ import annotations

from lifecycle import console, validation
from lifecycle.context import Services

__all__ = ["Consoles"]


class Consoles:
    """The consoles of one engine (``engine.consoles``)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def get_vnc_console(self, uuid: str) -> console.ConsoleAccess:
        """Issue a console token for an instance and return its access URL (Nova's ``os-getVNCConsole``)."""
        s = self._services
        instance = s.store.instances.get(validation.uuid(uuid))
        settings = s.settings
        return console.issue(s.store, s.driver, instance, settings.console_base_url, settings.console_token_ttl)

    def check_token(self, token: str) -> console.ConsoleConnection | None:
        """Return where to connect for a console token while valid and its guest still serves it, else None."""
        return console.check(self._services.store, token, self._services.driver)
