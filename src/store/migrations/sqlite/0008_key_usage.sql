-- Usage analytics: Authorize calls per key, bucket and outcome ('ALLOW' or a
-- deny reason's code). granularity is 'minute' or 'hour'; bucket_start is
-- unix microseconds. Every replica adds its counts to the same row (upsert
-- with addition), so a row holds the sum over replicas. Rows exist only for
-- outcomes that happened; old buckets are swept in batches.
CREATE TABLE key_usage (
    granularity     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    bucket_start    INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    organization_id TEXT,
    calls           INTEGER NOT NULL,
    PRIMARY KEY (granularity, key_id, bucket_start, outcome)
);
CREATE INDEX key_usage_by_org ON key_usage (granularity, organization_id, bucket_start);
CREATE INDEX key_usage_by_age ON key_usage (granularity, bucket_start);
