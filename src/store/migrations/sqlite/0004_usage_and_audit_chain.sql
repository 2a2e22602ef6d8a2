-- Previous-secret usage since the last rotation (written by usage flushes).
ALTER TABLE api_keys ADD COLUMN previous_secret_last_used_at INTEGER;
ALTER TABLE api_keys ADD COLUMN previous_secret_uses INTEGER NOT NULL DEFAULT 0;
-- The audit chain: SHA-256 over the previous event's hash and this event.
-- Rows written before this migration get theirs when keygate next starts.
ALTER TABLE key_events ADD COLUMN hash BLOB;
CREATE INDEX key_events_by_org ON key_events (organization_id, seq);
