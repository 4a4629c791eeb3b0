-- KEKTECH indexer schema, version 1.
-- Hashes and addresses are lowercase 0x hex text; uint256 amounts are numeric(78, 0).

CREATE TABLE indexer_state (
    id           smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,            -- last block whose logs are all stored
    block_hash   text        NOT NULL,
    last_seq     bigint      NOT NULL DEFAULT 0,  -- last publication sequence number assigned
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE publisher_state (
    id            smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    published_seq bigint      NOT NULL DEFAULT 0,  -- every outbox row up to here reached Redis
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO publisher_state (id) VALUES (1);

-- Who may write. A lease rather than a session advisory lock, so that it also works through
-- a transaction pooler (Supabase port 6543), where sessions are not kept.
CREATE TABLE indexer_lease (
    id         smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    owner      text,
    token      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO indexer_lease (id) VALUES (1);

-- Recent canonical headers, to detect reorgs by parent hash and find the common ancestor.
CREATE TABLE blocks (
    number      bigint PRIMARY KEY,
    hash        text   NOT NULL,
    parent_hash text   NOT NULL,
    timestamp   bigint NOT NULL
);

CREATE TABLE events (
    block_number      bigint      NOT NULL,
    log_index         integer     NOT NULL,
    block_hash        text        NOT NULL,
    block_time        timestamptz NOT NULL,
    transaction_hash  text        NOT NULL,
    transaction_index integer     NOT NULL,
    contract          text        NOT NULL,
    contract_kind     text        NOT NULL,
    event_name        text,                 -- NULL: a log the catalogue does not know (kept raw)
    market_address    text,
    topic0            text,
    topic1            text,
    topic2            text,
    topic3            text,
    data              text        NOT NULL,
    args              jsonb,
    seq               bigint,               -- publication sequence number (NULL if unpublished)
    PRIMARY KEY (block_number, log_index)
);
CREATE INDEX events_market_idx ON events (market_address, block_number, log_index)
    WHERE market_address IS NOT NULL;
CREATE INDEX events_name_idx ON events (event_name, block_number);
CREATE INDEX events_transaction_idx ON events (transaction_hash);

-- The markets projection, one row per market clone discovered from MarketCreated. Also the
-- registry of child contracts the indexer follows.
CREATE TABLE markets (
    address         text           PRIMARY KEY,
    factory         text           NOT NULL,
    creator         text           NOT NULL,
    question        text           NOT NULL,
    category        text           NOT NULL,  -- bytes32: keccak256 of the category name
    resolution_time numeric(78, 0) NOT NULL,
    creator_bond    numeric(78, 0) NOT NULL,
    state           text           NOT NULL,
    outcome         text           NOT NULL,
    rejected        boolean        NOT NULL,
    deactivated     boolean        NOT NULL,
    bets_outcome1   bigint         NOT NULL,
    bets_outcome2   bigint         NOT NULL,
    volume_outcome1 numeric(78, 0) NOT NULL,
    volume_outcome2 numeric(78, 0) NOT NULL,
    created_block   bigint         NOT NULL,
    created_tx      text           NOT NULL,
    created_at      timestamptz    NOT NULL,
    updated_block   bigint         NOT NULL
);
CREATE INDEX markets_state_idx ON markets (state);
CREATE INDEX markets_created_idx ON markets (created_block);

-- Transactional outbox: written in the same transaction as the events, drained to Redis in
-- seq order by the publisher, so a crash between commit and publish loses nothing.
CREATE TABLE outbox (
    seq        bigint      PRIMARY KEY,
    event_id   text        NOT NULL,
    channels   text        NOT NULL,  -- space-separated Redis channel names
    payload    bytea       NOT NULL,  -- the envelope as JSON
    created_at timestamptz NOT NULL DEFAULT now()
);
