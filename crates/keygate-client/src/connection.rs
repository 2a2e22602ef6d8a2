//! A connection to keygate that presents one credential on every call.

use keygate_proto::v1::authorizer_client::AuthorizerClient;
use keygate_proto::v1::key_admin_client::KeyAdminClient;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The token is not something a header can carry (a control character, a
/// non-ASCII byte).
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value")]
pub struct InvalidToken;

/// An API key as the `authorization: Bearer …` header every keygate call
/// accepts. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Credential(MetadataValue<Ascii>);

impl Credential {
    /// `token` (surrounding whitespace ignored) as a bearer credential.
    pub fn bearer(token: &str) -> Result<Self, InvalidToken> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// Puts the credential on `request`, replacing any there.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(Bearer …)")
    }
}

impl Interceptor for Credential {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.attach(&mut request);
        Ok(request)
    }
}

/// A keygate connection with the caller's credential. Cloning is cheap and
/// shares the connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    credential: Credential,
}

impl Client {
    /// Calls over `channel` as the key `token`.
    pub fn new(channel: Channel, token: &str) -> Result<Self, InvalidToken> {
        Ok(Self {
            channel,
            credential: Credential::bearer(token)?,
        })
    }

    /// Authorize and Check-style calls; the token to judge goes in each
    /// request, so no credential is attached.
    pub fn authorizer(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel.clone())
    }

    /// Key management, as this client's key.
    pub fn admin(&self) -> KeyAdminClient<InterceptedService<Channel, Credential>> {
        KeyAdminClient::with_interceptor(self.channel.clone(), self.credential.clone())
    }

    /// The revocation feed and the replica list, as this client's key.
    pub fn feed(&self) -> RevocationFeedClient<InterceptedService<Channel, Credential>> {
        RevocationFeedClient::with_interceptor(self.channel.clone(), self.credential.clone())
    }

    /// The credential this client presents.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The underlying connection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_bearer_headers_that_never_print() {
        let credential = Credential::bearer("  kg_test_abc  ").unwrap();
        let mut request = tonic::Request::new(());
        credential.attach(&mut request);
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer kg_test_abc"
        );
        assert!(!format!("{credential:?}").contains("kg_test"));
        assert!(Credential::bearer("a\nb").is_err());
    }
}
