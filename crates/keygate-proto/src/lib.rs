//! keygate.v1 on the wire: the generated messages, client stubs and service
//! traits, and the conversions between wire enums and domain enums.
//!
//! Wire types stop at the edge: servers and clients convert here and work in
//! `keygate_core` types beyond it.

#![deny(missing_docs)]

pub mod convert;

/// The generated `keygate.v1` package.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("keygate.v1");
}

/// The encoded descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keygate_descriptor");
