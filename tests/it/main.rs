//! Integration tests: a real keygate server on an ephemeral loopback port,

#![allow(clippy::unwrap_used)]
//! called through the generated gRPC clients, against SQLite and PostgreSQL.

mod harness;

mod admin_auth;
mod authorize;
mod binary;
mod concurrency;
mod lifecycle;
mod listing;
mod validation;
