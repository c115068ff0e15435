"""The scheduler, pure: each filter admits and refuses, weighers spread or stack, picks explain themselves."""

from __future__ import annotations

import random

import pytest

from lifecycle.errors import NoValidHost
from lifecycle.scheduler import FILTERS, HostState, Request, SchedulerSettings, filter_hosts, select_host, weigh

S = SchedulerSettings()
REQ = Request(vcpus=2, memory_mb=1024, disk_gb=10)


def host(name: str = "h", **kw: object) -> HostState:
    """A host with 8 vCPUs, 8 GiB and 100 GiB unless overridden."""
    base: dict[str, object] = {"vcpus": 8, "memory_mb": 8192, "disk_gb": 100}
    return HostState(name, **(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "admitted", "refused", "request_", "reason"),
    [
        ("RetryFilter", host("a"), host("b"), Request(1, 1, 1, tried=frozenset({"b"})), "already tried"),
        (
            "AvailabilityZoneFilter",
            host(availability_zone="az1"),
            host(availability_zone="az2"),
            Request(1, 1, 1, availability_zone="az1"),
            "availability zone az2, not az1",
        ),
        ("RamFilter", host(memory_mb=1024), host(memory_mb=600), REQ, "memory MiB: needs 1024, 900 of 900 free"),
        (
            "RamFilter",
            host(memory_mb=1000, memory_mb_used=400),
            host(memory_mb=1000, memory_mb_used=600),
            REQ,
            "needs 1024, 900 of 1500 free",
        ),
        ("CoreFilter", host(vcpus=1, vcpus_used=14), host(vcpus=1, vcpus_used=15), REQ, "vcpus: needs 2, 1 of 16 free"),
        ("DiskFilter", host(disk_gb=10), host(disk_gb=9), REQ, "disk GiB: needs 10, 9 of 9 free"),
        ("ComputeFilter", host(), host(enabled=False), REQ, "disabled"),
        ("ComputeFilter", host(), host(up=False), REQ, "down"),
        (
            "ComputeCapabilitiesFilter",
            host(capabilities={"ssd": "true"}),
            host(capabilities={"ssd": "false"}),
            Request(1, 1, 1, extra_specs={"capabilities:ssd": "true"}),
            "capability ssd is 'false'",
        ),
        (
            "ComputeCapabilitiesFilter",
            host(capabilities={"cpu_mhz": "3000"}),
            host(capabilities={"cpu_mhz": "2000"}),
            Request(1, 1, 1, extra_specs={"capabilities:cpu_mhz": ">= 2500"}),
            "flavor wants '>= 2500'",
        ),
        (
            "ComputeCapabilitiesFilter",
            host(capabilities={"gpu": "nvidia-a100"}),
            host(capabilities={}),
            Request(1, 1, 1, extra_specs={"gpu": "<in> a100", "hw:cpu_policy": "dedicated"}),
            "capability gpu is None",
        ),
        (
            "ComputeCapabilitiesFilter",
            host(capabilities={"tier": "gold"}),
            host(capabilities={"tier": "bronze"}),
            Request(1, 1, 1, extra_specs={"capabilities:tier": "<or> gold <or> silver"}),
            "tier is 'bronze'",
        ),
        (
            "ImagePropertiesFilter",
            host(architecture="aarch64"),
            host(architecture="x86_64"),
            Request(1, 1, 1, image_properties={"architecture": "aarch64"}),
            "image needs architecture aarch64",
        ),
        (
            "ImagePropertiesFilter",
            host(hypervisor_type="qemu"),
            host(hypervisor_type="xen"),
            Request(1, 1, 1, image_properties={"hypervisor_type": "qemu"}),
            "hypervisor_type qemu, host has xen",
        ),
    ],
)
def test_each_filter_admits_and_refuses(
    name: str, admitted: HostState, refused: HostState, request_: Request, reason: str
) -> None:
    """A filter passes the host that fits and rejects the other with a sentence an operator can act on."""
    check = FILTERS[name]
    assert check(admitted, request_, S) is None
    rejection = check(refused, request_, S)
    assert rejection is not None and reason in rejection


def test_untracked_hosts_pass_the_resource_filters() -> None:
    """A host whose resources are not tracked is never refused for capacity."""
    untracked = HostState("u")
    for name in ("RamFilter", "CoreFilter", "DiskFilter"):
        assert FILTERS[name](untracked, Request(999, 10**9, 10**6), S) is None


def test_no_valid_host_lists_every_reason() -> None:
    """When nothing fits, NoValidHost names each host with the first filter that refused it."""
    hosts = [host("full", memory_mb=100), host("off", enabled=False), host("away", availability_zone="x")]
    with pytest.raises(NoValidHost) as info:
        select_host(hosts, Request(1, 512, 1, availability_zone="nova"), S)
    assert info.value.reasons == {
        "away": "AvailabilityZoneFilter: in availability zone x, not nova",
        "full": "RamFilter: memory MiB: needs 512, 150 of 150 free (total 100 x ratio 1.5, used 0)",
        "off": "ComputeFilter: disabled",
    }
    assert "full: RamFilter" in str(info.value)


def test_positive_ram_multiplier_spreads_negative_stacks() -> None:
    """The emptier host wins with a positive multiplier, the fuller one with a negative multiplier."""
    empty, busy = host("empty"), host("busy", memory_mb_used=6000)
    assert select_host([busy, empty], REQ, S).name == "empty"
    assert select_host([busy, empty], REQ, SchedulerSettings(ram_weight_multiplier=-1.0)).name == "busy"


def test_weights_are_normalised() -> None:
    """RAM weights are scaled to [0, 1] across candidates before the multiplier."""
    ranked = weigh([host("a"), host("b", memory_mb_used=4096), host("c", memory_mb_used=12288)], S)
    assert [(round(w, 3), h.name) for w, h in ranked] == [(1.0, "a"), (0.667, "b"), (0.0, "c")]


def test_metrics_weigher_and_unavailable_metric() -> None:
    """The metrics weigher prefers the configured metric; a host missing it sinks to the bottom."""
    s = SchedulerSettings(metrics_weights=(("cpu.idle", 1.0),), metrics_weight_multiplier=10.0)
    hosts = [host("idle", metrics={"cpu.idle": 90}), host("busy", metrics={"cpu.idle": 10}), host("silent")]
    assert [h.name for _, h in weigh(hosts, s)] == ["idle", "busy", "silent"]


def test_subset_size_picks_randomly_among_the_best() -> None:
    """With a subset of 2, picks spread over the two best hosts and never the worst."""
    hosts = [host("a"), host("b", memory_mb_used=100), host("worst", memory_mb_used=8000)]
    rng = random.Random(7)
    picks = {select_host(hosts, REQ, SchedulerSettings(host_subset_size=2), rng).name for _ in range(50)}
    assert picks == {"a", "b"}


def test_filters_are_configurable() -> None:
    """A filter left out of the list no longer refuses anything."""
    passed, reasons = filter_hosts([host(enabled=False)], REQ, SchedulerSettings(filters=("RamFilter",)))
    assert [h.name for h in passed] == ["h"] and reasons == {}
