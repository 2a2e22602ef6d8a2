-- The settings an event left in force (every setting for a creation, the
-- changed ones for an update); '' for other events and for older rows, which
-- keeps their audit-chain hashes valid (details are hashed only when present).
ALTER TABLE key_events ADD COLUMN details TEXT NOT NULL DEFAULT '';
