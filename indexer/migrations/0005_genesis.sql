-- KEKTECH indexer schema, version 5: the hash of block 0 of the chain the database is indexed
-- from. The chain id alone does not tell that chain from a testnet or fork that kept it, or
-- from a node set up again from scratch: the indexer refuses a node whose block 0 is another
-- (indexer/startup.py). A database created before records it at its next start.
ALTER TABLE indexer_state ADD COLUMN genesis_hash text;
