"""The contracts the indexer follows from the configuration, and their record in the database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from indexer.catalog import ContractKind
from indexer.database import Database
from indexer.statements import columns

log = structlog.get_logger()

# How the commands an operator is told to run begin (docs/operations.md's layout).
INDEXER_COMMAND = "cd /opt/kektech && .venv/bin/python -m indexer"
# A backfill finds a factory's markets by their MarketCreated in the range it reads: none
# announced before the database began.
MARKETS_BEFORE = (
    "markets this factory announced before block {began}, where the database began, are not"
    " found by the backfill (nor by verify); if it announced any, `reindex --from <the block"
    " it was deployed at>` indexes them"
)


@dataclass(frozen=True, slots=True)
class Sources:
    """The contracts the indexer follows."""

    factories: frozenset[str]
    resolution_manager: str | None
    reward_distributor: str | None

    def static_kinds(self) -> dict[str, ContractKind]:
        kinds = {f: ContractKind.FACTORY for f in self.factories}
        if self.resolution_manager:
            kinds[self.resolution_manager] = ContractKind.RESOLUTION_MANAGER
        if self.reward_distributor:
            kinds[self.reward_distributor] = ContractKind.REWARD_DISTRIBUTOR
        return kinds


async def sources(db: Database) -> dict[str, int]:
    """The contracts recorded as followed, and the block each is followed from."""
    rows = await db.fetch("SELECT address, since_block FROM sources WHERE dropped_after IS NULL")
    return {r["address"]: int(r["since_block"]) for r in rows}


async def indexed_from(db: Database) -> int | None:
    """The block the database began at, as recorded with the cursor (indexer_state.began_at:
    START_BLOCK when it was created, lower after a reindex from below it); None before the
    cursor exists.

    Not the earliest block a recorded contract is followed from: a contract dropped from the
    configuration and configured again is followed again from the block after the cursor
    then, which would move "where the database began" up, and the reorg handling would trust
    a block above stored ones as an ancestor. A database migrated to version 4 without a
    record (no contract recorded, no event stored: 0004_began_at.sql) gets it at its next
    start, from START_BLOCK (record_sources); None until then too.
    """
    began = await db.fetchval("SELECT began_at FROM indexer_state WHERE id = 1")
    return None if began is None else int(began)


async def began_at(db: Database, *, start_block: int) -> int:
    """Where the database began (indexed_from), or START_BLOCK for one that has no cursor
    yet, which begins there: what the reorg handling and `verify` go by, as an operator may
    have changed START_BLOCK since."""
    began = await indexed_from(db)
    return start_block if began is None else began


def start_block_changed(start_block: int, began: int | None) -> str | None:
    """What a START_BLOCK other than where the database began means, or None if it is not."""
    if began is None or began == start_block:
        return None
    return (
        f"START_BLOCK {start_block}, but the database began at block {began}: START_BLOCK sets"
        " where a new database begins; this one goes on from its cursor, and `verify` (looking"
        f" for the factories' markets) and the reorg handling go by block {began}; set"
        f" START_BLOCK={began} again"
    )


async def recorded_kinds(db: Database) -> dict[str, str]:
    """The role (ContractKind value) each contract recorded as followed was indexed in."""
    rows = await db.fetch("SELECT address, kind FROM sources WHERE dropped_after IS NULL")
    return {r["address"]: r["kind"] for r in rows}


async def _reconcile_roles(db: Database, static: Mapping[str, ContractKind]) -> None:
    """Say which configured contracts have events stored in another role than the one they
    are configured in now (an address pasted into the wrong variable, then corrected): those
    were decoded as the other role's, a factory's markets were not followed, and a backfill
    skips what is stored. A reindex from the first of them indexes them again; once none is
    left (after it, or if there never were), the record takes the configured role."""
    recorded = await recorded_kinds(db)
    for address, kind in static.items():
        was = recorded.get(address)
        if was is None or was == kind.value:
            continue
        first = await db.fetchval(
            "SELECT min(block_number) FROM events WHERE contract = $1 AND contract_kind = $2",
            address,
            was,
        )
        if first is None:
            await db.execute("UPDATE sources SET kind = $2 WHERE address = $1", address, kind.value)
            log.info(
                "a contract is recorded in its configured role now",
                contract=address,
                kind=kind.value,
                was=was,
            )
            continue
        log.warning(
            "a contract is configured in another role than its stored events were indexed "
            "in: they were decoded as the recorded role's (a factory's markets are not "
            "followed from them); a reindex from the first of them indexes them again",
            contract=address,
            configured=kind.value,
            recorded=was,
            first_block=int(first),
            reindex=f"{INDEXER_COMMAND} reindex --from {first}",
        )


async def dropped_sources(db: Database) -> dict[str, int]:
    """The contracts recorded as dropped from the configuration, and the cursor then."""
    rows = await db.fetch(
        "SELECT address, dropped_after FROM sources WHERE dropped_after IS NOT NULL"
    )
    return {r["address"]: int(r["dropped_after"]) for r in rows}


async def add_sources(db: Database, rows: Sequence[tuple[str, str, int]]) -> None:
    """Record contracts as (address, kind, since_block): one followed already stays, one
    dropped before is followed again from `since_block`, its record keeping the role its
    stored events were indexed in (_reconcile_roles compares it with the configured one)."""
    await db.execute(
        "INSERT INTO sources (address, kind, since_block)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
        " ON CONFLICT (address) DO UPDATE SET"
        " since_block = EXCLUDED.since_block, dropped_after = NULL"
        " WHERE sources.dropped_after IS NOT NULL",
        *columns(rows, 3),
    )


async def drop_sources(db: Database, addresses: Sequence[str], *, cursor: int) -> None:
    """Mark contracts no longer configured as dropped after block `cursor`."""
    await db.execute(
        "UPDATE sources SET dropped_after = $2"
        " WHERE address = ANY($1::text[]) AND dropped_after IS NULL",
        addresses,
        cursor,
    )


async def record_sources(
    db: Database,
    static: Mapping[str, ContractKind],
    *,
    cursor: int,
    start_block: int,
    created: bool,
) -> None:
    """Record the configured contracts and the block each is followed from, and say so when
    the configuration gained one after indexing began (its earlier events, and the markets a
    factory created before, are not indexed until backfilled: said at every start until the
    backfill is done) or lost one.

    `created`: the cursor was created by this start (a new database).
    """
    known = await sources(db)
    began = await indexed_from(db)
    if not created and (changed := start_block_changed(start_block, began)):
        log.warning(
            "START_BLOCK differs from where the database began", detail=changed, began=began
        )
    added = {a: k for a, k in static.items() if a not in known}
    later = not created and await _recorded_before(db)
    since = cursor + 1 if later else start_block
    if added:
        await add_sources(db, [(a, k.value, since) for a, k in added.items()])
    # A database indexed before contracts were recorded (schema version 1) had no record of
    # where it began to migrate (0004_began_at.sql): START_BLOCK, as for its contracts.
    await db.execute(
        "UPDATE indexer_state SET began_at = coalesce((SELECT min(since_block) FROM sources), $1)"
        " WHERE id = 1 AND began_at IS NULL",
        start_block,
    )
    dropped = sorted(known.keys() - static.keys())
    for address in dropped:
        log.warning(
            "a contract recorded as followed is no longer in the configuration: its "
            "events (and a factory's markets') are no longer indexed; configured again, "
            "it will be said to need a backfill",
            contract=address,
        )
    if dropped:  # kept, marked: `verify` tells their events from those of unknown contracts
        await drop_sources(db, dropped, cursor=cursor)
    # After the additions: one dropped before and configured again in another role is
    # recorded again in the role it was indexed in.
    await _reconcile_roles(db, static)
    await _say_backfills_needed(db, await began_at(db, start_block=start_block))


async def _recorded_before(db: Database) -> bool:
    """Whether this database recorded the contracts it follows before now (dropped ones
    count): what is configured now and not recorded was then not followed. One created since
    schema version 4 that recorded none followed none (its first starts had none configured),
    unless it stores events: those, as one without the record of where it began, were indexed
    before contracts were recorded (schema version 1), following those configured from
    START_BLOCK."""
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM sources) OR ((SELECT began_at FROM indexer_state"
            " WHERE id = 1) IS NOT NULL AND NOT EXISTS (SELECT 1 FROM events))"
        )
    )


async def backfills_needed(db: Database, began: int) -> list[tuple[str, str, int]]:
    """The contracts followed from a block above where the database began, (address, kind,
    since_block) by address: their events below it are not stored until a backfill from
    `began` (mark_backfilled records it)."""
    rows = await db.fetch(
        "SELECT address, kind, since_block FROM sources"
        " WHERE dropped_after IS NULL AND since_block > $1 ORDER BY address",
        began,
    )
    return [(r["address"], r["kind"], int(r["since_block"])) for r in rows]


def backfill_command(began: int, since: int) -> str:
    """The command that stores a contract's events from where the database began up to the
    block it is followed from."""
    return f"{INDEXER_COMMAND} backfill --from {began} --to {since - 1}"


# What marks [first, last] backfilled (mark_backfilled; a rollback, whose ancestor is $1 - 1,
# indexes every configured contract above it again: $2 unbounded).
MARK_BACKFILLED = (
    "UPDATE sources SET since_block = $1::bigint"
    " WHERE dropped_after IS NULL AND since_block > $1::bigint AND since_block <= $2::bigint + 1"
)


async def mark_backfilled(db: Database, first: int, last: int) -> None:
    """Record that [first, last] was backfilled: a contract followed from a block in it (or
    from the one after) has its events from `first` on."""
    await db.execute(MARK_BACKFILLED, first, last)


async def _say_backfills_needed(db: Database, began: int) -> None:
    for address, kind, since in await backfills_needed(db, began):
        log.warning(
            "a contract was added to the configuration after indexing began: followed "
            "from a later block; its earlier events need a backfill (said at each start "
            "until it is done)",
            contract=address,
            kind=kind,
            followed_from=since,
            backfill=backfill_command(began, since),
            **({"markets_before": MARKETS_BEFORE.format(began=began)} if kind == "factory" else {}),
        )
