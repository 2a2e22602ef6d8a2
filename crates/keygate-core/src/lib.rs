//! Pure logic: tokens, scopes, route policy, key lifecycle and the Authorize
//! decision. Nothing here does I/O or knows about gRPC or SQL.

#![deny(missing_docs)]

pub mod analytics;
pub mod audit;
pub mod bounds;
pub mod cidr;
pub mod clock;
pub mod decision;
pub mod event;
pub mod freshness;
pub mod grant;
pub mod intern;
pub mod jwt;
pub mod key;
pub mod key_id;
pub mod limits;
pub mod organization;
pub mod page;
pub mod policy;
pub mod scope;
pub mod token;
pub mod usage;
