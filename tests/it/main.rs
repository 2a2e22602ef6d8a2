//! Integration tests: a real keygate server on an ephemeral loopback port,
//! called through the generated gRPC clients, against SQLite and PostgreSQL.

#![allow(clippy::unwrap_used)]

mod harness;

mod abuse;
mod admin_auth;
mod analytics;
mod audit;
mod authorize;
mod binary;
mod cache;
mod cli;
mod concurrency;
mod console;
mod deny_map;
mod envoy;
mod faults;
mod feed;
mod forged;
mod gateway;
mod hostile;
mod jwt;
mod jwt_support;
mod lifecycle;
mod limits;
mod listing;
mod multi_replica;
mod operations;
mod org_limits;
mod replicas;
mod restrictions;
mod shared_limits;
mod telemetry;
mod tls;
mod unlimited;
mod usage;
mod validation;
mod walkthrough;
