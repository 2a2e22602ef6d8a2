//! The generated wire types, and conversions between them and domain types.
//! Validation of incoming fields happens here, at the edge.

#![allow(clippy::all, clippy::pedantic)]

pub mod keygate {
    pub mod v1 {
        tonic::include_proto!("keygate.v1");
    }
}

/// The encoded descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keygate_descriptor");
