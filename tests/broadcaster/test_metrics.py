"""broadcaster/metrics.py: what a fresh instance exports before anything happened."""

from __future__ import annotations

import re

from broadcaster import metrics
from devnet.process import REPO_ROOT


def test_every_refusal_reason_is_exported_at_zero_from_the_start() -> None:
    """Each reason's series exists at 0 before its first refusal: a series that appears only
    with it starts at its first value, which Prometheus's increase() cannot count, so a
    single burst of refusals would never raise KektechBroadcasterFull."""
    rendered = metrics.Metrics().render().decode().splitlines()
    for reason in ("path", "origin", "headers", "ip_limit", "full"):
        assert f'kektech_broadcaster_rejected_total{{reason="{reason}"}} 0.0' in rendered


def test_every_reason_the_broadcaster_refuses_for_is_created_at_start() -> None:
    """The reasons counted anywhere in broadcaster/ are those REJECT_REASONS creates at 0."""
    source = "\n".join(path.read_text() for path in (REPO_ROOT / "broadcaster").glob("*.py"))
    used = set(re.findall(r'rejected\.labels\(reason="([a-z_]+)"\)', source))
    assert "full" in used  # the pattern finds them at all
    assert used == set(metrics.REJECT_REASONS)
