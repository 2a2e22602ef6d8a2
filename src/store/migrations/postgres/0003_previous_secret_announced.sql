-- 1 once the revocation feed has announced that the previous secret's grace
-- period ended (EXPIRED_SECRET), so it is announced exactly once.
ALTER TABLE api_keys ADD COLUMN previous_secret_announced BIGINT NOT NULL DEFAULT 0;
CREATE INDEX api_keys_unannounced_expiry ON api_keys (previous_secret_expires_at)
    WHERE previous_secret_announced = 0;
