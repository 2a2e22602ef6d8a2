-- Times are unix microseconds, UTC. Digests are SHA-256 of the secret; no secret is stored.
CREATE TABLE api_keys (
    id                         TEXT PRIMARY KEY,
    name                       TEXT NOT NULL,
    organization_id            TEXT,
    tier                       TEXT NOT NULL,
    mode                       TEXT NOT NULL,
    prefix                     TEXT NOT NULL,
    secret_digest              BLOB NOT NULL,
    previous_secret_digest     BLOB,
    previous_secret_expires_at INTEGER,
    scopes                     TEXT NOT NULL,
    allowed_cidrs              TEXT NOT NULL,
    rate_limit_per_minute      INTEGER NOT NULL,
    status                     TEXT NOT NULL,
    created_at                 INTEGER NOT NULL,
    last_used_at               INTEGER,
    expires_at                 INTEGER,
    revoked_at                 INTEGER,
    revoked_reason             TEXT,
    rotated_at                 INTEGER,
    created_by                 TEXT NOT NULL,
    version                    INTEGER NOT NULL
);
CREATE INDEX api_keys_by_org ON api_keys (organization_id, created_at, id);
CREATE INDEX api_keys_by_created ON api_keys (created_at, id);

CREATE TABLE key_events (
    seq             INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    organization_id TEXT,
    actor           TEXT NOT NULL,
    at              INTEGER NOT NULL,
    reason          TEXT NOT NULL
);
CREATE INDEX key_events_by_key ON key_events (key_id, seq);

-- Server-wide secrets shared by every replica (the page-token MAC key).
CREATE TABLE keygate_settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
