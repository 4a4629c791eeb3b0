-- KEKTECH indexer schema, version 3: a contract dropped from the configuration keeps its row
-- in `sources`, marked with the cursor it was dropped at, so that `verify` can tell the
-- events of a contract no longer followed from those of a contract never followed (a
-- difference). Configured again, the row is followed again (dropped_after back to NULL).
ALTER TABLE sources ADD COLUMN dropped_after bigint;  -- NULL: followed
