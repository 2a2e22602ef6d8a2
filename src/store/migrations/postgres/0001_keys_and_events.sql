-- Times are unix microseconds, UTC. Digests are SHA-256 of the secret; no secret is stored.
CREATE TABLE api_keys (
    id                         TEXT PRIMARY KEY,
    name                       TEXT NOT NULL,
    organization_id            TEXT,
    tier                       TEXT NOT NULL,
    mode                       TEXT NOT NULL,
    prefix                     TEXT NOT NULL,
    secret_digest              BYTEA NOT NULL,
    previous_secret_digest     BYTEA,
    previous_secret_expires_at BIGINT,
    scopes                     TEXT NOT NULL,
    allowed_cidrs              TEXT NOT NULL,
    rate_limit_per_minute      BIGINT NOT NULL,
    status                     TEXT NOT NULL,
    created_at                 BIGINT NOT NULL,
    last_used_at               BIGINT,
    expires_at                 BIGINT,
    revoked_at                 BIGINT,
    revoked_reason             TEXT,
    rotated_at                 BIGINT,
    created_by                 TEXT NOT NULL,
    version                    BIGINT NOT NULL
);
CREATE INDEX api_keys_by_org ON api_keys (organization_id, created_at, id);
CREATE INDEX api_keys_by_created ON api_keys (created_at, id);

CREATE TABLE key_events (
    seq             BIGINT PRIMARY KEY,
    kind            TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    organization_id TEXT,
    actor           TEXT NOT NULL,
    at              BIGINT NOT NULL,
    reason          TEXT NOT NULL
);
CREATE INDEX key_events_by_key ON key_events (key_id, seq);

-- Server-wide secrets shared by every replica (the page-token MAC key).
CREATE TABLE keygate_settings (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
