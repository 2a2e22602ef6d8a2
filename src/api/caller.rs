//! Who is calling: the credential in the request metadata, checked like any
//! Authorize token, plus the key's IP allow-list against the peer address;
//! or a JWT from an issuer trusted for admin.

use std::net::SocketAddr;

use keygate_core::decision::{self, DenyReason};
use keygate_core::token;
use tonic::metadata::MetadataMap;

use crate::error::Error;
use crate::jwt::{self, Refused, Use};
use crate::service::{Authorizer, Caller};

/// The credential from `authorization: Bearer <token>` or `x-api-key: <token>`.
pub fn credential(metadata: &MetadataMap) -> Option<&str> {
    token::find_credential(&token::DEFAULT_CREDENTIAL_HEADERS, |name| {
        metadata.get(name).and_then(|v| v.to_str().ok())
    })
}

pub async fn authenticate(
    authorizer: &Authorizer,
    metadata: &MetadataMap,
    peer: Option<SocketAddr>,
) -> Result<Caller, Error> {
    let token = credential(metadata).ok_or(Error::Denied(DenyReason::MissingToken))?;
    if jwt::looks_like_jwt(token) {
        return match authorizer.jwt().verify(token, Use::Admin).await {
            Ok(verified) => {
                tracing::Span::current()
                    .record("key_id", tracing::field::display(verified.identity.actor()));
                Ok(Caller::from_jwt(verified))
            }
            Err(Refused::Denied(reason)) => Err(Error::Denied(reason)),
            Err(Refused::Unavailable(issuer)) => Err(Error::KeysUnavailable(issuer)),
        };
    }
    let key = authorizer
        .authenticate(token)
        .await?
        .map_err(Error::Denied)?;
    // The RPC's span names the calling key (never its token).
    tracing::Span::current().record("key_id", tracing::field::display(key.id));
    if !decision::ip_allowed(&key, peer.map(|p| p.ip())) {
        return Err(Error::Denied(DenyReason::IpNotAllowed));
    }
    Ok(Caller::new(key))
}
