//! keygate: API-key authorization over gRPC.
#![deny(missing_docs)]

pub mod api;
pub mod cache;
pub mod cli;
pub mod error;
pub mod feed;
pub mod index;
pub mod jwt;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
