//! The one error type of the service layer, and its one mapping to gRPC status.

use keygate_core::decision::DenyReason;
use keygate_core::grant::Exceeds;
use keygate_core::key::LifecycleError;
use keygate_core::page::BadPageToken;
use keygate_proto::convert::deny_code;
use tonic::{Code, Status};

use crate::store::StoreError;

/// Everything a service-layer call can fail with, in the domain's words.
///
/// `From<Error> for tonic::Status` below is the only mapping to gRPC codes;
/// each variant names the code it becomes. The display text is the status
/// message, except for UNAVAILABLE and INTERNAL, whose details (hosts, SQL)
/// go to the log and whose message is generic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message names it (INVALID_ARGUMENT).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, as the API spells it.
        field: &'static str,
        /// What is wrong with it, for the caller.
        reason: String,
    },
    /// The named thing does not exist (NOT_FOUND). Also what another
    /// organization's key or organization looks like.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The key's lifecycle forbids the change, e.g. changing a revoked key
    /// or disabling a disabled one (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(#[from] LifecycleError),
    /// The caller's own credential was refused: UNAUTHENTICATED,
    /// PERMISSION_DENIED or RESOURCE_EXHAUSTED as the reason's HTTP status
    /// says (`keygate_proto::convert::deny_code`).
    #[error("{}: {}", .0.code(), .0.message())]
    Denied(DenyReason),
    /// The caller is authenticated but may not do this (PERMISSION_DENIED).
    #[error("INSUFFICIENT_SCOPE: {0}")]
    InsufficientScope(String),
    /// The change would give a key more than the caller has (mode,
    /// allow-list, expiry, rate limit); the message names the restriction
    /// (PERMISSION_DENIED).
    #[error(transparent)]
    Exceeds(#[from] Exceeds),
    /// The caller holds as much of a bounded resource as it may; the message
    /// names the bound (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Concurrent changes kept winning; the caller may retry (ABORTED).
    #[error("{0}")]
    Aborted(&'static str),
    /// A change is in force, but not every live replica confirmed it in
    /// time; the message names the laggards (DEADLINE_EXCEEDED).
    #[error("{0}")]
    ReplicasLagging(String),
    /// The key store failed: [`StoreError::Conflict`] becomes ALREADY_EXISTS,
    /// [`StoreError::Unavailable`] and [`StoreError::Busy`] UNAVAILABLE,
    /// anything else INTERNAL.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A JWT's issuer has no keys keygate can trust right now (never
    /// fetched, or not refreshed for too long), so the token cannot be
    /// checked and is not accepted (UNAVAILABLE). Names the issuer.
    #[error("the keys of JWT issuer {0} are unavailable")]
    KeysUnavailable(String),
    /// Something that should not happen did (a broken invariant, the OS
    /// random source failing); the message is for the log (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// [`Error::InvalidArgument`] for `field`, with `reason` as the caller
    /// will read it.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<BadPageToken> for Error {
    fn from(e: BadPageToken) -> Self {
        Error::invalid("page_token", e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Denied(reason) => deny_code(*reason),
            Error::InsufficientScope(_) | Error::Exceeds(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::ReplicasLagging(_) => Code::DeadlineExceeded,
            Error::Store(store) => match store.root() {
                StoreError::Conflict => Code::AlreadyExists,
                StoreError::CannotWrite(_) => Code::FailedPrecondition,
                StoreError::Unavailable(_) | StoreError::TimedOut(_) | StoreError::Busy => {
                    Code::Unavailable
                }
                _ => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
            Error::KeysUnavailable(_) => {
                tracing::warn!(error = %e, "jwt refused");
                return Status::unavailable(e.to_string());
            }
        };
        match code {
            // Store details (hosts, SQL) stay in the log, not in the answer.
            Code::Unavailable | Code::Internal => {
                let busy = matches!(&e, Error::Store(s) if matches!(s.root(), StoreError::Busy));
                if busy {
                    // Shed load, not a fault: one line per call would flood the log.
                    tracing::debug!("request shed: key store busy");
                } else {
                    tracing::error!(error = %e, "request failed");
                }
                let message = if busy {
                    "key store busy"
                } else if code == Code::Unavailable {
                    "key store unavailable"
                } else {
                    "internal error"
                };
                Status::new(code, message)
            }
            _ => {
                if matches!(&e, Error::Store(s) if matches!(s.root(), StoreError::CannotWrite(_))) {
                    // Nothing the caller can fix: the operator must.
                    tracing::error!(error = %e, "write refused by the store");
                }
                Status::new(code, e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_reasons_map_to_auth_codes() {
        let s: Status = Error::Denied(DenyReason::InvalidToken).into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().starts_with("INVALID_TOKEN"));
        let s: Status = Error::Denied(DenyReason::IpNotAllowed).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status =
            Error::Store(StoreError::Shared(std::sync::Arc::new(StoreError::Busy))).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "key store busy")
        );
        let s: Status = Error::Store(StoreError::CannotWrite("the disk is full")).into();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::FailedPrecondition,
                "key store cannot write: the disk is full"
            )
        );
        let s: Status = Error::invalid("name", "must not be empty").into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "name: must not be empty")
        );
        let s: Status = Error::from(BadPageToken).into();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::InvalidArgument,
                "page_token: malformed, tampered with, or from a different query"
            )
        );
    }
}
