"""The libvirt backend's job-state mapping (:func:`balloonctl.backends.libvirt.migration_from_job`),
as a unit test: a real migration needs a second host, which the test libvirtd does not have.
The dicts are what ``virDomainGetJobStats`` returns (``dom.jobStats()``)."""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from balloonctl.backends.libvirt import migration_from_job  # noqa: E402


@pytest.mark.parametrize(
    ("job", "migrating"),
    [
        pytest.param({"type": libvirt.VIR_DOMAIN_JOB_NONE}, False, id="no-job"),
        pytest.param({}, False, id="empty"),
        pytest.param(
            {
                "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
                "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
                "time_elapsed": 1200,
            },
            True,
            id="migration-out",
        ),
        pytest.param(
            {
                "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
                "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN,
            },
            True,
            id="migration-in",
        ),
        pytest.param(
            {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED}, True, id="no-operation-unknown-holds"
        ),
        pytest.param(
            {"type": libvirt.VIR_DOMAIN_JOB_BOUNDED, "operation": 999},
            True,
            id="unknown-operation-holds",
        ),
        pytest.param(
            {
                "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
                "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP,
            },
            False,
            id="dump",
        ),
        pytest.param(
            {
                "type": libvirt.VIR_DOMAIN_JOB_BOUNDED,
                "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE,
            },
            False,
            id="save",
        ),
        pytest.param(
            {
                "type": libvirt.VIR_DOMAIN_JOB_COMPLETED,
                "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
            },
            False,
            id="completed",
        ),
    ],
)
def test_job_stats_map_to_migrating(job: dict[str, int], migrating: bool) -> None:
    assert migration_from_job(job) is migrating
