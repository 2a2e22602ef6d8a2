//! `keygate bootstrap`: the very first key.

use std::sync::Arc;

use clap::Args;

use super::StoreArgs;
use crate::domain::clock::SystemClock;
use crate::domain::key::Mode;
use crate::domain::token::Brand;
use crate::server::{Keygate, Settings};
use crate::store::sql_redact;

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// A name for the key, e.g. "ops admin".
    #[arg(long, env = "KEYGATE_BOOTSTRAP_NAME")]
    name: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Token brand, as for serve.
    #[arg(long, env = "KEYGATE_BRAND", default_value = "kg")]
    brand: String,
    #[arg(long, env = "KEYGATE_BOOTSTRAP_MODE", value_parser = ["live", "test"], default_value = "live")]
    mode: String,
}

pub async fn run(args: BootstrapArgs) -> Result<(), String> {
    let brand = Brand::new(&args.brand).map_err(|e| format!("--brand: {e}"))?;
    let name = args.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err("--name: must be 1-200 characters without control characters".into());
    }
    let mode = Mode::parse(&args.mode).unwrap_or(Mode::Live);
    let url = args.store.url();
    let settings = Settings {
        brand,
        ..Settings::new(url.clone())
    };
    let keygate = Keygate::open(settings, Arc::new(SystemClock))
        .await
        .map_err(|e| format!("opening {}: {e}", sql_redact(&url)))?;
    let (key, token) = keygate
        .keys
        .bootstrap(name, mode)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "Created SYSTEM key {} ({}) with scope *:*.",
        key.id, key.name
    );
    eprintln!("Store this token now: it is shown once and cannot be recovered.");
    println!("{token}");
    Ok(())
}
