-- 1 for a key that is never counted against a rate limit (only a SYSTEM key
-- can make one); every key written before this migration is counted.
ALTER TABLE api_keys ADD COLUMN unlimited INTEGER NOT NULL DEFAULT 0;
