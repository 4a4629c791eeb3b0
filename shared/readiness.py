"""Tell a supervisor that this service is ready: PM2's `wait_ready` over its IPC channel.

PM2 (lib/God/ForkMode.js) spawns a fork-mode app with stdio ['pipe', 'pipe', 'pipe', 'ipc'],
so Node passes one end of a Unix socket pair and names its descriptor in NODE_CHANNEL_FD
(NODE_CHANNEL_SERIALIZATION_MODE=json). Node's JSON serialization frames each message as
JSON text followed by a newline; PM2 turns any message without `type` and `data` into a
`process:msg` with `raw` set to it, and `wait_ready` (lib/God.js) marks the process online
when `raw === "ready"`. So the whole message is the seven bytes `"ready"` and a newline. Any
interpreter can write them: PM2 never checks that the child runs Node.

Until then PM2 shows the process as `launching`; after `listen_timeout` without the message
it marks it online anyway, so a readiness that never comes is a slow start, not a dead app.
"""

from __future__ import annotations

import os

import structlog

__all__ = ["READY_MESSAGE", "notify_ready"]

log = structlog.get_logger()

READY_MESSAGE = b'"ready"\n'
# Set by Node's child_process when the parent opened an IPC channel (PM2 always does).
# Read here and not through the settings: it is the supervisor's protocol, like systemd's
# NOTIFY_SOCKET, and never configured by the operator.
CHANNEL_VARIABLE = "NODE_CHANNEL_FD"


def notify_ready(service: str, **details: object) -> bool:
    """Log that `service` is ready and tell PM2 if it started us; True if PM2 was told.

    Call once, when the service can do its job. Not running under PM2 is normal (a
    terminal, systemd, the tests): that is logged at debug level and changes nothing.
    """
    channel = os.environ.get(CHANNEL_VARIABLE, "")
    log.info("ready", service=service, supervisor="pm2" if channel else None, **details)
    if not channel:
        log.debug("no IPC channel (NODE_CHANNEL_FD unset): not started by PM2")
        return False
    try:
        fd = int(channel)
        written = os.write(fd, READY_MESSAGE)
    except (ValueError, OSError) as exc:
        # PM2 still marks the process online after listen_timeout; say why it waits.
        log.warning(
            "could not tell PM2 the service is ready; it waits for listen_timeout",
            channel=channel,
            error=str(exc),
        )
        return False
    if written != len(READY_MESSAGE):  # a socket pair takes 8 bytes whole; never seen
        log.warning("short write of the ready message to PM2", written=written)
        return False
    return True
