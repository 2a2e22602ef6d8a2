-- Every replica's position in the event log, with a heartbeat (unix microseconds).
CREATE TABLE replicas (
    replica_id       TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    applied_sequence INTEGER NOT NULL,
    heartbeat_at     INTEGER NOT NULL
);
