"""`kektech check`: each alert condition is reported once it is made true for real, not before."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path

import pytest

from devnet.anvil_node import Anvil
from devnet.chain import Deployment
from devnet.redis_server import Redis
from ops.monitor import count_restarts
from ops.probes.memory import read_memory
from tests.broadcaster.support import running, settings_for
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.ops import (
    dead_port,
    make_certificate,
    other_http_server,
    pm2_daemon,
    run_kektech,
    tls_server,
    waiting_indexer_env,
    write_script,
)
from tests.support.waiting import eventually

# Long enough for a few checks (one takes over a second: a Python start and a probe) to run
# silently while the condition holds, on a slow machine too.
DOWN_AFTER = 10.0
CRASH = "import sys, time\ntime.sleep(0.2)\nsys.exit(1)\n"
STEADY = "import time\nwhile True:\n    time.sleep(60)\n"


def check_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """Settings of a check run whose state lives in the test's directory."""
    state = str(tmp_path / "state" / "monitor.json")
    return {"MONITOR_STATE_FILE": state, "OPS_TIMEOUT": "3", **values}


async def test_endpoint_down_is_reported_only_after_the_threshold(
    redis_server: Redis, tmp_path: Path
) -> None:
    """A stopped broadcaster is reported once down for MONITOR_DOWN_AFTER seconds, not earlier."""
    settings = settings_for(redis_server.url, f"test:{os.getpid()}:monitor")
    url = f"ws://127.0.0.1:{settings.ws_port}{settings.ws_path}"
    env = check_env(tmp_path, MONITOR_WS_URL=url, MONITOR_DOWN_AFTER=str(DOWN_AFTER))
    async with running(settings):
        healthy = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
        assert (healthy.code, healthy.stdout) == (0, ""), healthy

    loop = asyncio.get_running_loop()
    stopped = loop.time()
    silent_starts = []
    while True:
        started = loop.time()
        result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
        if result.code != 0:
            break
        assert result.stdout == "", result
        silent_starts.append(started - stopped)
        assert started - stopped < DOWN_AFTER + 20, "never reported"
    # Checked while down (at least twice, the last one well into the threshold), all silent.
    assert len(silent_starts) >= 2
    assert silent_starts[-1] >= DOWN_AFTER / 2
    assert loop.time() - stopped >= DOWN_AFTER
    assert result.code == 1, result
    assert result.lines == [result.line("websocket")]
    assert result.stdout.startswith(f"ALERT  websocket  {url} down for ")

    async with running(settings):
        back = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
        assert (back.code, back.stdout) == (0, ""), back
    state = json.loads((tmp_path / "state" / "monitor.json").read_text())
    assert "down_since" not in state["websocket"]


async def test_an_indexer_waiting_at_start_up_is_reported_after_the_threshold(
    anvil: Anvil, deployment: Deployment, redis_server: Redis, tmp_path: Path
) -> None:
    """An indexer whose start-up waits for its database is online for PM2 and restarts
    nothing, so only this condition sees it: reported once it has waited MONITOR_DOWN_AFTER."""
    env = waiting_indexer_env(anvil, deployment, redis_server)
    check = check_env(
        tmp_path,
        INDEXER_HTTP_PORT=env["INDEXER_HTTP_PORT"],
        MONITOR_DOWN_AFTER=str(DOWN_AFTER),
    )
    with IndexerProcess(env, log_dir=tmp_path) as indexer:
        await indexer.wait_waiting_for("database")
        first = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
        assert (first.code, first.stdout) == (0, ""), first  # not for long enough yet
        started = time.monotonic()

        async def reported() -> bool:
            result = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
            return result.code == 1

        await eventually(reported, within=30, what="the waiting indexer is reported")
        assert time.monotonic() - started >= DOWN_AFTER - 1
        result = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
    assert result.stdout.startswith("ALERT  indexer  start-up waits for: database unreachable"), (
        result
    )
    # Stopped: still failing since the wait began, now as "not answering".
    gone = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
    assert gone.stdout.startswith("ALERT  indexer  not answering"), gone


async def test_an_indexer_that_cannot_publish_is_reported(
    anvil: Anvil, deployment: Deployment, database_url: str, tmp_path: Path
) -> None:
    """Redis stopped under a running indexer: it indexes on (events wait in the outbox),
    PM2 shows it online and the WebSocket endpoint answers, so nothing reported that no
    browser got an event. Reported once it has lasted MONITOR_DOWN_AFTER; gone once Redis
    answers again."""
    with Redis(workdir=tmp_path) as own:
        env = indexer_env(
            database_url=database_url,
            redis_url=own.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key=f"test:{os.getpid()}:publishing",
        )
        check = check_env(
            tmp_path, INDEXER_HTTP_PORT=env["INDEXER_HTTP_PORT"], MONITOR_DOWN_AFTER="0"
        )
        with IndexerProcess(env, log_dir=tmp_path) as indexer:
            await indexer.wait_ready()

            async def healthy() -> bool:
                result = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
                return (result.code, result.stdout) == (0, "")

            # Its publisher's first look at Redis comes within a few seconds of the start.
            await eventually(healthy, within=30, what="no alert with Redis up")
            own.stop()

            async def reported() -> bool:
                result = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
                return result.stdout.startswith(
                    "ALERT  indexer  publishes nothing: Redis does not answer"
                )

            await eventually(reported, within=30, what="the indexer reported not publishing")
            own.start()
            await eventually(healthy, within=30, what="the alert gone with Redis back")


async def test_an_indexer_listening_on_ipv6_loopback_is_reached(
    anvil: Anvil, deployment: Deployment, redis_server: Redis, tmp_path: Path
) -> None:
    """An indexer whose health port listens on ::1 is asked at http://[::1]:port, not at the
    invalid http://::1:port, which was reported as not answering."""
    env = waiting_indexer_env(anvil, deployment, redis_server, INDEXER_HTTP_HOST="::1")
    check = check_env(
        tmp_path,
        INDEXER_HTTP_HOST="::1",
        INDEXER_HTTP_PORT=env["INDEXER_HTTP_PORT"],
        MONITOR_DOWN_AFTER="0",  # what it finds is reported at once
    )
    with IndexerProcess(env, log_dir=tmp_path) as indexer:
        await indexer.wait_waiting_for("database")
        result = await run_kektech("check", "--only", "indexer", env=check, cwd=tmp_path)
    # It answered: what is reported is what its start-up waits for.
    assert result.stdout.startswith("ALERT  indexer  start-up waits for: database unreachable"), (
        result
    )


async def test_another_program_on_the_indexer_port_is_not_taken_for_it(tmp_path: Path) -> None:
    """Another program answering on the indexer's port is no indexer: it counts as the
    indexer not answering, and is reported after MONITOR_DOWN_AFTER like that."""
    async with other_http_server() as port:
        env = check_env(tmp_path, INDEXER_HTTP_PORT=str(port), MONITOR_DOWN_AFTER="0")
        result = await run_kektech("check", "--only", "indexer", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.stdout.startswith(
        "ALERT  indexer  answers HTTP 200 without an indexer's health report (for 0 s)"
    ), result


async def test_crash_looping_pm2_app_is_reported_and_a_steady_one_is_not(tmp_path: Path) -> None:
    """An app PM2 restarts more than 3 times within the hour is reported; a steady app is not."""
    async with pm2_daemon() as pm2:
        await pm2.start("crasher", write_script(tmp_path / "crash.py", CRASH))
        await pm2.start("steady", write_script(tmp_path / "steady.py", STEADY))

        async def crashed_four_times() -> bool:
            return await pm2.restarts("crasher") >= 4

        await eventually(crashed_four_times, within=30, what="crasher restarted 4 times")
        env = check_env(tmp_path, **pm2.env, MONITOR_MAX_RESTARTS="3", OPS_PM2_APPS="steady")
        result = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert len(result.lines) == 1, result
    assert result.stdout.startswith("ALERT  pm2  crasher#0 restarted "), result
    assert "in the last 60 min" in result.stdout
    assert "steady" not in result.stdout


async def test_an_app_stopped_errored_or_absent_is_reported(tmp_path: Path) -> None:
    """Each app of OPS_PM2_APPS must be in PM2's list with every instance online, every run:
    an app PM2 gave up on (errored) or that was stopped no longer restarts, so its restart
    counter alone would stop alerting about it after one window."""
    async with pm2_daemon() as pm2:
        await pm2.start("steady", write_script(tmp_path / "steady.py", STEADY))
        await pm2.start("halted", write_script(tmp_path / "halted.py", STEADY))
        await pm2.run("stop", "halted")
        env = check_env(tmp_path, **pm2.env, OPS_PM2_APPS="steady,halted,absent")
        result = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert len(result.lines) == 2, result
    assert result.lines[0].startswith("ALERT  pm2  halted: 1 of 1 instances not online"), result
    assert result.lines[1].startswith("ALERT  pm2  absent: not in the PM2 process list"), result
    assert "steady" not in result.stdout


async def test_an_app_pm2_gave_up_on_while_showing_waiting_restart_is_reported(
    tmp_path: Path,
) -> None:
    """With a restart delay (ecosystem.config.js has exp_backoff_restart_delay), PM2 7 leaves
    an app that failed max_restarts times early in "waiting restart" and never restarts it. That
    status usually means "restarting in a moment", so it is reported once it outlasts the
    delay, every run while it lasts."""
    async with pm2_daemon() as pm2:
        script = write_script(tmp_path / "fail.py", "import sys\nsys.exit(1)\n")
        options = ("--exp-backoff-restart-delay", "100", "--max-restarts", "5")
        await pm2.start("quitter", script, *options)

        async def given_up() -> bool:
            log = (pm2.home / "pm2.log").read_text(errors="replace")
            return "too many unstable restarts" in log

        await eventually(given_up, within=30, what="PM2 gave up on the app")
        [process] = await pm2.processes()
        assert process["pm2_env"]["status"] == "waiting restart"  # PM2's bug, as on a VPS
        env = check_env(tmp_path, **pm2.env, OPS_PM2_APPS="quitter", MONITOR_MAX_RESTARTS="100")
        first = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
        assert (first.code, first.stdout) == (0, ""), first  # maybe about to restart

        async def reported() -> bool:
            result = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
            return result.code == 1

        await eventually(reported, within=30, what="the stuck app is reported")
        result = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.stdout.startswith(
        "ALERT  pm2  quitter: 1 of 1 instances not online (#0 waiting restart, not restarted"
    ), result


async def test_restarts_older_than_the_window_are_no_longer_reported(tmp_path: Path) -> None:
    """Once its restarts fall out of MONITOR_RESTART_WINDOW, an app that settled is not reported."""
    marks = tmp_path / "marks"
    settles = (
        "import pathlib, sys, time\n"
        f"marks = pathlib.Path({str(marks)!r})\n"
        "with marks.open('a') as f:\n    f.write('x')\n"
        "if len(marks.read_text()) <= 5:\n    sys.exit(1)\n"
        "while True:\n    time.sleep(60)\n"
    )
    loop = asyncio.get_running_loop()
    async with pm2_daemon() as pm2:
        began = loop.time()
        await pm2.start("settler", write_script(tmp_path / "settle.py", settles))

        async def settled() -> bool:
            return marks.exists() and len(marks.read_text()) >= 6

        await eventually(settled, within=30, what="the app crashed 5 times and settled")
        assert await pm2.restarts("settler") == 5
        # The window must still hold every restart at the first check below, which follows
        # the start, the crashes and `pm2 jlist` on however slow a machine: a few times what
        # they took, not a fixed figure that a loaded machine can exceed.
        window = 5.0 + 3 * math.ceil(loop.time() - began)
        env = check_env(
            tmp_path, **pm2.env, MONITOR_RESTART_WINDOW=str(window), OPS_PM2_APPS="settler"
        )
        recent = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
        # Its samples were taken at some moment of that run, at the latest now: timed from
        # before it, a run slowed by a loaded machine left the restarts in the window.
        first_seen = loop.time()
        assert recent.code == 1, recent
        assert recent.stdout.startswith("ALERT  pm2  settler#0 restarted 5 times"), recent
        # Real time must pass: the condition is about the last `window` seconds.
        await asyncio.sleep(window + 0.5 - (loop.time() - first_seen))
        later = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
    assert (later.code, later.stdout) == (0, ""), later


async def test_memory_above_the_threshold_is_reported(tmp_path: Path) -> None:
    """Memory in use above MONITOR_MEMORY_PERCENT is reported; below it, nothing is."""
    used = read_memory().used_percent
    below = await run_kektech(
        "check",
        "--only",
        "memory",
        env=check_env(tmp_path, MONITOR_MEMORY_PERCENT=f"{used / 2:.2f}"),
        cwd=tmp_path,
    )
    assert below.code == 1, below
    assert below.stdout.startswith("ALERT  memory  "), below
    assert f"(above {float(f'{used / 2:.2f}'):g}%)" in below.stdout
    above = await run_kektech(
        "check",
        "--only",
        "memory",
        env=check_env(tmp_path, MONITOR_MEMORY_PERCENT=f"{(used + 100) / 2:.2f}"),
        cwd=tmp_path,
    )
    assert (above.code, above.stdout) == (0, ""), above


@pytest.mark.parametrize(("days", "alert"), [(3, True), (90, False)])
async def test_certificate_expiring_within_7_days_is_reported(
    tmp_path: Path, days: int, alert: bool
) -> None:
    """A served certificate valid 3 more days is reported; one valid 90 days is not."""
    cert, key = make_certificate(tmp_path, days=days)
    async with tls_server(cert, key) as port:
        env = check_env(tmp_path, OPS_TLS_ENDPOINT=f"127.0.0.1:{port}", OPS_TLS_CA_FILE=str(cert))
        result = await run_kektech("check", "--only", "tls", env=env, cwd=tmp_path)
    if alert:
        assert result.code == 1, result
        prefix = f"ALERT  tls  certificate of 127.0.0.1:{port} expires in "
        assert result.stdout.startswith(prefix), result
        assert 2.9 <= float(result.stdout.removeprefix(prefix).split()[0]) <= 3.0
    else:
        assert (result.code, result.stdout) == (0, ""), result


async def test_unwritable_state_file_is_an_error_not_silence(tmp_path: Path) -> None:
    """When the state cannot be saved, check says so and exits 2 (it could not evaluate)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = check_env(
        tmp_path,
        MONITOR_STATE_FILE=str(blocker / "monitor.json"),
        MONITOR_WS_URL="ws://127.0.0.1:1/ws",
    )
    result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
    assert result.code == 2, result
    assert all(line.startswith("ERROR  state  ") for line in result.lines), result
    assert "ERROR  state  cannot write in " in result.stdout


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--only", ""), "argument --only: at least one name is required (choose from websocket, "),
        (("--skip", "websocket,indexer,pm2,memory,tls"), "--skip leaves nothing to check"),
    ],
)
async def test_a_selection_of_no_condition_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    """An empty --only evaluated every condition, and a --skip of all of them printed
    "OK no alert ( checked)" and exit 0 to cron: both are usage errors (exit 2) instead."""
    result = await run_kektech("check", "--verbose", *args, env=check_env(tmp_path), cwd=tmp_path)
    assert result.code == 2, result
    assert result.stdout == "", result
    assert f"kektech check: error: {error}" in result.stderr, result


def test_restart_counting_uses_the_window_and_survives_a_counter_reset() -> None:
    """Restarts count from the last sample before the window; a reset counter adds its value."""
    samples = [(0.0, 7), (10.0, 9), (20.0, 1)]  # `pm2 reset` between 10 and 20, then 1 crash
    assert count_restarts(samples, now=20.0, window=3600) == 3
    assert count_restarts(samples, now=20.0, window=5) == 1
    assert count_restarts([(20.0, 4)], now=20.0, window=5) == 0


async def test_downtime_is_not_counted_across_a_gap_in_the_runs(tmp_path: Path) -> None:
    """A failure remembered from before a long gap in the runs (the VPS or cron was down)
    does not make the first failing run after it alert at once with an inflated downtime."""
    url = f"ws://127.0.0.1:{dead_port()}/ws"
    env = check_env(tmp_path, MONITOR_WS_URL=url, MONITOR_DOWN_AFTER="300")
    state_file = tmp_path / "state" / "monitor.json"
    state_file.parent.mkdir()
    long_ago = time.time() - 3600
    remembered = {"url": url, "down_since": long_ago, "checked_at": long_ago}
    state_file.write_text(json.dumps({"websocket": remembered}))
    result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
    assert (result.code, result.stdout) == (0, ""), result
    assert json.loads(state_file.read_text())["websocket"]["down_since"] > long_ago


async def test_an_alert_delay_below_the_run_interval_still_alerts(tmp_path: Path) -> None:
    """With MONITOR_DOWN_AFTER below the minute between cron runs, consecutive runs are no gap
    in the monitoring: a failure seen a minute ago and still there is reported."""
    url = f"ws://127.0.0.1:{dead_port()}/ws"
    env = check_env(tmp_path, MONITOR_WS_URL=url, MONITOR_DOWN_AFTER="30")
    state_file = tmp_path / "state" / "monitor.json"
    state_file.parent.mkdir()
    now = time.time()
    remembered = {"url": url, "down_since": now - 120, "checked_at": now - 60}
    state_file.write_text(json.dumps({"websocket": remembered}))
    result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.stdout.startswith(f"ALERT  websocket  {url} down for ")


async def test_a_state_file_that_is_not_utf8_is_started_over(tmp_path: Path) -> None:
    """A state file damaged into bytes that are not UTF-8 is started over like any torn one,
    not a traceback at every run from then on."""
    url = f"ws://127.0.0.1:{dead_port()}/ws"
    env = check_env(tmp_path, MONITOR_WS_URL=url, MONITOR_DOWN_AFTER="300")
    state_file = tmp_path / "state" / "monitor.json"
    state_file.parent.mkdir()
    state_file.write_bytes(b'{"websocket": {"url": "\xff"}}')
    result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
    assert (result.code, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr
    assert "websocket" in json.loads(state_file.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "damaged",
    [
        "[" * 100_000 + "]" * 100_000,  # nested too deep for the parser (RecursionError)
        '{"websocket": {"checked_at": ' + "9" * 5000 + "}}",  # an integer too long to convert
    ],
    ids=["deeply-nested", "over-long-integer"],
)
async def test_a_state_file_python_cannot_load_is_started_over(
    tmp_path: Path, damaged: str
) -> None:
    """A state file that is JSON Python refuses to load is started over like a torn one,
    and rewritten, rather than a traceback and no finding at every run from then on."""
    url = f"ws://127.0.0.1:{dead_port()}/ws"
    env = check_env(tmp_path, MONITOR_WS_URL=url, MONITOR_DOWN_AFTER="300")
    state_file = tmp_path / "state" / "monitor.json"
    state_file.parent.mkdir()
    state_file.write_text(damaged)
    result = await run_kektech("check", "--only", "websocket", env=env, cwd=tmp_path)
    assert (result.code, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr
    assert "websocket" in json.loads(state_file.read_text(encoding="utf-8"))


async def test_a_saved_restart_count_that_is_no_number_is_dropped(tmp_path: Path) -> None:
    """A hand-edited sample such as NaN or Infinity in the state file is dropped like any
    malformed one, instead of failing the whole pm2 condition (and its other alerts) at
    every run."""
    async with pm2_daemon() as pm2:
        await pm2.start("steady", write_script(tmp_path / "steady.py", STEADY))
        state_file = tmp_path / "state" / "monitor.json"
        state_file.parent.mkdir()
        now = time.time()
        saved = {"steady#0": [[now - 100, float("nan")], [now - 50, float("inf")]]}
        state_file.write_text(json.dumps({"pm2": saved}))
        env = check_env(tmp_path, **pm2.env, OPS_PM2_APPS="steady,absent")
        result = await run_kektech("check", "--only", "pm2", env=env, cwd=tmp_path)
    assert result.code == 1, result
    assert result.lines == [result.line("pm2")], result
    assert result.stdout.startswith("ALERT  pm2  absent: not in the PM2 process list"), result
