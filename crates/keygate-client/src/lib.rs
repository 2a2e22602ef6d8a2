//! What a Rust gateway embeds to use keygate: [`Client`], a connection with
//! the caller's credential on every call, and [`CachedAuthorizer`], Authorize
//! with a short cache of ALLOW decisions kept honest by the revocation feed.
//!
//! Nothing of the server comes with it (CI checks `cargo tree -p
//! keygate-client`): the wire types are `keygate_proto`, the rules
//! `keygate_core`.

#![deny(missing_docs)]

pub mod cached;
mod connection;

pub use cached::{CachedAuthorizer, ClientSettings};
pub use connection::{Client, Credential, InvalidToken};
pub use keygate_proto::v1 as pb;
