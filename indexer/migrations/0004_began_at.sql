-- KEKTECH indexer schema, version 4: where the database began (the block after its first
-- cursor: START_BLOCK when it was created), recorded with the cursor. The reorg handling
-- trusts the block before it as an ancestor, and `verify` looks for the factories' markets
-- from it. It was read as the earliest `since_block` in `sources`, which a contract dropped
-- from the configuration and configured again moves up (to the block after the cursor then).
-- A rollback onto a block below it (a reindex from lower) moves it down; nothing moves it up.
ALTER TABLE indexer_state ADD COLUMN began_at bigint;
-- A database created before: the best record it has is the earliest since_block, or the
-- earliest stored event if lower (stored, so the database holds blocks from there: below a
-- since_block moved up as above, or a reindex or backfill from below it). One with neither
-- (indexed before version 2, not started since) is filled at its next start from
-- START_BLOCK, as its contracts are recorded (indexer/sources.py, record_sources).
UPDATE indexer_state SET began_at = least(
    (SELECT min(since_block) FROM sources),
    (SELECT min(block_number) FROM events)
);
