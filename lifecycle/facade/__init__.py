"""The engine's calls that are not instance operations, grouped by noun.

They are ``engine.hosts``, ``engine.images``, ``engine.feed``, ``engine.duties``
and ``engine.consoles``.

Instance operations stay typed methods of :class:`lifecycle.Engine`; its reads
(``get``, ``list``, ``task``, ``tasks``, ``steps``, ``history``, ``migrations``)
come from :class:`Reads`, a base class over the store. Each group here is a
small object the engine builds once from its
:class:`~lifecycle.context.Services` and never from the engine itself.
"""

from __future__ import annotations

from lifecycle.facade.consoles import Consoles
from lifecycle.facade.drivers import DriverCache, DriverFactory
from lifecycle.facade.duties import Duties
from lifecycle.facade.feed import Feed
from lifecycle.facade.hosts import Hosts
from lifecycle.facade.images import Images
from lifecycle.facade.reads import Reads

__all__ = ["Consoles", "DriverCache", "DriverFactory", "Duties", "Feed", "Hosts", "Images", "Reads"]
