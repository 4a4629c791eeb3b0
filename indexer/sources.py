"""The contracts the indexer follows from the configuration, and their record in the database."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from indexer.catalog import ContractKind
from indexer.store import Store

log = structlog.get_logger()


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


async def record_sources(
    store: Store,
    static: Mapping[str, ContractKind],
    *,
    cursor: int,
    start_block: int,
    created: bool,
) -> None:
    """Record the configured contracts and the block each is followed from, and say so when
    the configuration gained one after indexing began (its earlier events, and the markets a
    factory created before, are not indexed until backfilled) or lost one.

    `created`: the cursor was created by this start (a new database).
    """
    known = await store.sources()
    added = {a: k for a, k in static.items() if a not in known}
    # A new database, or one indexed before contracts were recorded: from START_BLOCK.
    later = not created and bool(known)
    since = cursor + 1 if later else start_block
    if added:
        await store.add_sources([(a, k.value, since) for a, k in added.items()])
    for address, kind in added.items() if later else ():
        log.warning(
            "a contract was added to the configuration after indexing began: followed "
            "from the block after the cursor; its earlier events need a backfill",
            contract=address,
            kind=kind.value,
            followed_from=since,
            backfill="cd /opt/kektech && .venv/bin/python -m indexer backfill "
            f"--from {start_block} --to {cursor}",
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
        await store.drop_sources(dropped, cursor=cursor)
