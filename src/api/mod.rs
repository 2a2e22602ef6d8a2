//! The gRPC transport: thin services over the service layer.

pub mod admin;
pub mod admission;
pub mod authorizer;
mod caller;
pub mod check_request;
pub mod check_wire;
pub mod connection;
pub mod console;
pub mod convert;
pub mod ext_authz;
pub mod feed;
pub mod validate;
