-- KEKTECH indexer schema, version 2: the contracts the configuration names (factories, the
-- resolution manager, the reward distributor) and the block each is followed from. A contract
-- added to the configuration after indexing began is followed from the cursor on; the
-- indexer says so at start, with the backfill that fetches its earlier events.
CREATE TABLE sources (
    address     text   PRIMARY KEY,
    kind        text   NOT NULL,
    since_block bigint NOT NULL
);
