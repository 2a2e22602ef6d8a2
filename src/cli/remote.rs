//! Talking to a running keygate: the server address and the caller's token.

use clap::Args;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Where keygate runs, and who is asking.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// keygate's gRPC address.
    #[arg(long, env = "KEYGATE_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
}

impl RemoteArgs {
    pub async fn connect(&self) -> Result<Channel, String> {
        let endpoint = Channel::from_shared(self.server.clone())
            .map_err(|e| format!("--server {}: {e}", self.server))?;
        endpoint
            .connect()
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.server))
    }
}

/// The caller's token, from KEYGATE_TOKEN (never a flag: flags show up in
/// process listings and shell history).
pub fn authorized<T>(message: T) -> Result<tonic::Request<T>, String> {
    let token =
        std::env::var("KEYGATE_TOKEN").map_err(|_| "set KEYGATE_TOKEN to an API key".to_owned())?;
    let value: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| "KEYGATE_TOKEN is not a valid token".to_owned())?;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// "CODE: message" for a failed call.
pub fn status_error(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
