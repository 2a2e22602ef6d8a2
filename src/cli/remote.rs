//! Talking to a running keygate: the server address, how to trust it (TLS,
//! mTLS), and the caller's token.

use std::path::{Path, PathBuf};

use clap::Args;
use keygate_client::Client;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::DEFAULT_PORT;

/// Where keygate runs, and who is asking.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// keygate's gRPC address: http://… in plaintext, https://… over TLS.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_SERVER",
        default_value_t = format!("http://127.0.0.1:{DEFAULT_PORT}")
    )]
    server: String,
    /// PEM CA bundle that signed the server's certificate (https:// only).
    #[arg(long, global = true, env = "KEYGATE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mTLS; needs --client-key.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// PEM private key for --client-cert.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl RemoteArgs {
    pub async fn connect(&self) -> Result<Channel, String> {
        let mut endpoint = Channel::from_shared(self.server.clone())
            .map_err(|e| format!("--server {}: {e}", self.server))?;
        let https = self.server.starts_with("https://");
        if let Some(tls) = self.tls_config()? {
            if !https {
                return Err(format!(
                    "--ca-cert and --client-cert need an https:// --server, not {}",
                    self.server
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("--server {}: {e}", self.server))?;
        }
        endpoint.connect().await.map_err(|e| {
            // tonic's Display is only "transport error"; the causes say why.
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why = format!("{why}: {c}");
                cause = c.source();
            }
            let hint = if https && self.ca_cert.is_none() {
                " (pass --ca-cert with the CA that signed the server's certificate)"
            } else {
                ""
            };
            format!("connecting to {}: {why}{hint}", self.server)
        })
    }

    /// `None` when no TLS file is given (plaintext, or https:// with
    /// tonic's default roots).
    fn tls_config(&self) -> Result<Option<ClientTlsConfig>, String> {
        if self.ca_cert.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read("--ca-cert", ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        Ok(Some(tls))
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// A connected client calling as the key in KEYGATE_TOKEN (never a flag:
/// flags show up in process listings and shell history).
pub async fn client(remote: &RemoteArgs) -> Result<Client, String> {
    let channel = remote.connect().await?;
    let token =
        std::env::var("KEYGATE_TOKEN").map_err(|_| "set KEYGATE_TOKEN to an API key".to_owned())?;
    Client::new(channel, &token).map_err(|_| "KEYGATE_TOKEN is not a valid token".to_owned())
}

/// "CODE: message" for a failed call.
pub fn status_error(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
