"""Engine settings: one frozen dataclass, units and reasons in attribute docstrings."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lifecycle.errors import InvalidInput
from lifecycle.scheduler import FILTERS, SchedulerSettings
from lifecycle.sync import Policy
from lifecycle.validation import count, seconds, unsafe_character

__all__ = ["RUNNING_DELETED_ACTIONS", "Settings", "listen_address", "web_origin"]

RUNNING_DELETED_ACTIONS = ("reap", "shutdown", "log", "noop")
DOMAIN_TYPES = ("kvm", "qemu")
"""libvirt domain types for QEMU hosts (libvirt's test driver always gets ``test``)."""
_SECONDS = (
    "shutdown_timeout",
    "shutdown_retry_interval",
    "lease_seconds",
    "heartbeat_seconds",
    "preempt_wait_seconds",
    "host_down_after",
    "sync_interval",
    "stopped_event_delay",
    "resize_confirm_window",
    "console_token_ttl",
    "console_idle_timeout",
    "image_cache_max_age",
    "soft_reboot_seconds",
    "running_deleted_instance_timeout",
    "reclaim_instance_interval",
    "instance_build_timeout",
    "change_retention",
    "feed_poll_interval",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of an engine; the defaults are Nova's where Nova has one."""

    shutdown_timeout: float = 60.0
    """Seconds a clean shutdown may take before the guest is destroyed (Nova: 60)."""
    shutdown_retry_interval: float = 10.0
    """Seconds between repeated ACPI shutdown requests (Nova: 10)."""
    lease_seconds: float = 60.0
    """How long a running task's lease lasts; renewed at every step and by a heartbeat."""
    heartbeat_seconds: float = 15.0
    """How often the engine renews the leases of the tasks it runs."""
    workers: int = 4
    """Threads running tasks started with ``wait=False``."""
    max_concurrent_builds: int = 10
    """Spawns one engine runs at once on one host; a build beyond waits its turn (Nova: max_concurrent_builds, 10)."""
    preempt_wait_seconds: float = 30.0
    """How long a hard reboot waits for a preempted pause or suspend still inside the driver to end."""
    preempt_retries: int = 5
    """How often a preempting operation retries a lost compare-and-swap before giving up."""
    libvirt_domain_type: str = "kvm"
    """libvirt domain type for qemu URIs: kvm, or qemu for software emulation (TCG)."""
    vnc_listen: str = "127.0.0.1"
    """Address guests' VNC servers listen on."""
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    """Filters, weighers, allocation ratios and attempts of the placement scheduler."""
    host_down_after: float = 60.0
    """A host whose daemon has not reported for this many seconds is down (Nova: service_down_time)."""
    sync_policy: Policy = field(default_factory=Policy)
    """How the power sync resolves each kind of disagreement (default: Nova's)."""
    sync_chunk_size: int = 1000
    """Instances read per query in a sync pass, so memory does not grow with the host."""
    sync_interval: float = 600.0
    """Seconds between the daemon's periodic passes per host (Nova: 600)."""
    stopped_event_delay: float = 15.0
    """Seconds a STOPPED event is held; any later event for the domain cancels it (Nova: 15)."""
    resize_confirm_window: float = 0.0
    """Seconds after a move finished before the daemon confirms it; 0 turns the window off (Nova)."""
    resize_window_action: str = "confirm"
    """What the window does: confirm (default: a revert discards what the guest wrote) or revert."""
    running_deleted_instance_action: str = "reap"
    """What a sync pass does with a domain whose instance is deleted: reap (destroy it and its disk),
    shutdown (power it off), log, or noop (Nova's names)."""
    reap_unknown_domains: bool = False
    """Also apply that action to domains named as ours that no row of this database knows. Off by
    default: after a database restored from an older backup those are live guests, not leftovers."""
    running_deleted_instance_timeout: float = 0.0
    """Seconds after the delete before the action applies (Nova: 0), so a slow delete is not raced."""
    console_base_url: str = "http://127.0.0.1:6080/vnc_lite.html"
    """Base of console access URLs (a noVNC page); the token goes in its ``path`` query."""
    console_token_ttl: float = 600.0
    """Seconds a console token stays valid (Nova: 600)."""
    console_proxy_listen: str = "127.0.0.1:6080"
    """ADDR:PORT the console proxy (``lifecycle console-proxy``) serves its page and websockets on (Nova: 6080)."""
    console_allowed_origins: tuple[str, ...] = ()
    """Origins (``scheme://host[:port]``) whose pages may open console websockets; empty: only the origin
    of ``console_base_url``, the proxy's own page. A request with another Origin, or none, is refused."""
    console_max_connections_per_token: int = 2
    """Console sessions one token may hold open at once (a reload opens the next before the last closes)."""
    console_max_connections: int = 100
    """Console sessions the proxy holds open at once, over all tokens."""
    console_idle_timeout: float = 1800.0
    """Seconds a console session may pass with no byte either way before the proxy closes it; 0: never."""
    console_metrics_listen: str = ""
    """Where the console proxy serves ``/metrics``: empty, on its console port (as before); ``ADDR:PORT``, on
    that address instead, and the console port answers 404 there; ``off``, nowhere."""
    console_page_dir: str = ""
    """Folder the proxy serves the console page and noVNC from; empty: the checkout's ``console/dist``,
    which ``scripts/console-assets.sh`` builds."""
    image_cache_max_age: float = 86400.0
    """Seconds an unused cached base image is kept before cleanup removes it (Nova: 86400)."""
    soft_reboot_seconds: float = 120.0
    """How long a soft reboot waits for the guest to go down before rebooting hard (Nova: 120)."""
    reclaim_instance_interval: float = 0.0
    """With more than 0, delete is a soft delete, restorable for this many seconds, then the daemon
    deletes it for good (Nova); 0 deletes at once."""
    instance_build_timeout: float = 0.0
    """Seconds a build may take before the daemon ends it failed and puts the instance in error (Nova); 0: off."""
    shelved_offload_time: float = 0.0
    """Seconds a shelved instance keeps its host before the daemon offloads it (destroys its domain and
    disk, releases its claims); 0 offloads at once, as part of the shelve; -1 never (Nova: 0)."""
    image_store_dir: str = ""
    """Directory on the engine's machine for the images the engine makes (shelve snapshots); empty:
    ``$XDG_DATA_HOME/lifecycle/images`` (``~/.local/share/lifecycle/images``)."""
    change_retention: float = 0.0
    """Seconds a change (an audit row: the feed is the audit log) is kept before ``engine.feed.prune()`` removes
    it, and never before every registered feed consumer has passed it; 0 keeps every change."""
    feed_poll_interval: float = 1.0
    """Seconds between a change feed follower's reads on SQLite; on PostgreSQL, where commits wake it,
    between re-reads while a committed change waits for an older transaction to end (at least 0.01)."""

    def __post_init__(self) -> None:
        choices = {
            "running_deleted_instance_action": RUNNING_DELETED_ACTIONS,
            "resize_window_action": ("confirm", "revert"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidInput(f"setting {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in _SECONDS:
            seconds(f"setting {name}", getattr(self, name))
        if self.shelved_offload_time != -1:  # Nova's "never"
            seconds("setting shelved_offload_time (or -1: never)", self.shelved_offload_time)
        count("setting workers", self.workers, low=1, high=1024)
        count("setting max_concurrent_builds", self.max_concurrent_builds, low=1)
        if not isinstance(self.reap_unknown_domains, bool):
            raise InvalidInput(f"setting reap_unknown_domains must be True or False, got {self.reap_unknown_domains!r}")
        if not isinstance(self.scheduler, SchedulerSettings):
            raise InvalidInput(f"setting scheduler must be a SchedulerSettings, got {type(self.scheduler).__name__}")
        for ratio in ("cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio"):
            value = getattr(self.scheduler, ratio)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise InvalidInput(f"setting scheduler.{ratio} must be a finite number above 0, got {value!r}")
        count("setting sync_chunk_size", self.sync_chunk_size, low=1, high=1_000_000)
        seconds("setting feed_poll_interval", self.feed_poll_interval, low=0.01)
        self._check_more()

    def _check_more(self) -> None:
        """Check the remaining fields: choices, addresses, counts, and the nested settings."""
        if self.libvirt_domain_type not in DOMAIN_TYPES:
            allowed = ", ".join(DOMAIN_TYPES)
            raise InvalidInput(
                f"setting libvirt_domain_type must be one of {allowed}, got {self.libvirt_domain_type!r}"
            )
        try:
            ipaddress.ip_address(self.vnc_listen)
        except ValueError:
            raise InvalidInput(f"setting vnc_listen must be an IP address, got {self.vnc_listen!r}") from None
        if not _is_http_url(self.console_base_url):
            raise InvalidInput(f"setting console_base_url must be an http(s) URL, got {self.console_base_url!r}")
        store = self.image_store_dir
        if (
            not isinstance(store, str)
            or unsafe_character(store)
            or (store and not (store.startswith(("/", "~")) and os.path.isabs(os.path.expanduser(store))))
        ):
            raise InvalidInput(f"setting image_store_dir must be an absolute directory path (or empty), got {store!r}")
        count("setting preempt_retries", self.preempt_retries, low=0, high=100)
        self._check_console()
        s = self.scheduler
        unknown = [f for f in s.filters if f not in FILTERS]
        if not isinstance(s.filters, tuple) or unknown:
            raise InvalidInput(
                f"setting scheduler.filters has unknown filters {unknown!r}; known: {', '.join(sorted(FILTERS))}"
            )
        count("setting scheduler.max_attempts", s.max_attempts, low=1, high=100)
        count("setting scheduler.host_subset_size", s.host_subset_size, low=1, high=100_000)
        weights = [("ram_weight_multiplier", s.ram_weight_multiplier)]
        weights += [("metrics_weight_multiplier", s.metrics_weight_multiplier)]
        weights += [("metrics_unavailable_weight", s.metrics_unavailable_weight)]
        weights += [(f"metrics_weights[{name!r}]", ratio) for name, ratio in s.metrics_weights]
        for name, value in weights:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInput(f"setting scheduler.{name} must be a finite number, got {value!r}")
        count("setting sync_policy.missing_threshold", self.sync_policy.missing_threshold, low=1, high=1_000_000)

    def _check_console(self) -> None:
        """Check the console proxy's settings: its address, the allowed origins, the limits, the page folder."""
        listen = listen_address("setting console_proxy_listen", self.console_proxy_listen)
        metrics = self.console_metrics_listen
        if metrics not in ("", "off"):
            label = "setting console_metrics_listen (empty: on the console port; off: nowhere; or ADDR:PORT)"
            if listen_address(label, metrics) == listen and listen[1] != 0:
                raise InvalidInput(
                    f"setting console_metrics_listen {metrics!r} is console_proxy_listen itself: leave it empty to"
                    " serve /metrics on the console port"
                )
        origins = self.console_allowed_origins
        if not isinstance(origins, tuple) or len(origins) > 100:
            raise InvalidInput(f"setting console_allowed_origins must be a list of origins, got {origins!r}")
        for origin in origins:
            web_origin("setting console_allowed_origins", origin)
        count("setting console_max_connections_per_token", self.console_max_connections_per_token, low=1, high=1000)
        count("setting console_max_connections", self.console_max_connections, low=1, high=100_000)
        page_dir = self.console_page_dir
        if not isinstance(page_dir, str) or len(page_dir) > 4096 or unsafe_character(page_dir):
            raise InvalidInput(f"setting console_page_dir must be a folder path, got {page_dir!r}")


def _is_http_url(value: object) -> bool:
    """Say whether ``value`` is an http(s) URL with a host, a valid port if any, and no unsafe character."""
    if not isinstance(value, str) or unsafe_character(value):
        return False
    try:
        url = urlsplit(value)
        url.port  # noqa: B018  # parsing the port is the check: an unclosed "[::1" or a port past 65535 raise
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


def listen_address(label: str, value: object) -> tuple[str, int]:
    """Return ``(address, port)`` from ``ADDR:PORT`` (an IP address, IPv6 in brackets; port 0 picks a free one)."""
    text = value if isinstance(value, str) else ""
    addr, sep, port = text.rpartition(":")
    addr = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    try:
        ipaddress.ip_address(addr)
        number = int(port, 10) if port.isascii() and port.isdigit() else -1
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise InvalidInput(f"{label} must be ADDR:PORT with an IP address and a port up to 65535, got {value!r}")
    return addr, number


def web_origin(label: str, value: object) -> str:
    """Return ``value`` if it is a web origin as browsers send it: ``http(s)://host[:port]``, lower case, no path."""
    text = value if isinstance(value, str) else ""
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        url, port = None, None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.hostname
        or text != f"{url.scheme}://{url.netloc}"
        or url.netloc != url.netloc.lower()
        or "@" in url.netloc
        or port == {"http": 80, "https": 443}[url.scheme]
        or unsafe_character(text)
    ):
        raise InvalidInput(f"{label}: {value!r} is not an origin such as https://console.example.org:6080")
    return text
