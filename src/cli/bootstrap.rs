//! `keygate bootstrap`: the very first key.

use std::sync::Arc;

use clap::Args;
use keygate_core::bounds;
use keygate_core::clock::SystemClock;
use keygate_core::key::Mode;
use keygate_core::token::{Brand, DEFAULT_BRAND};

use super::StoreArgs;
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
    #[arg(long, env = "KEYGATE_BRAND", default_value = DEFAULT_BRAND)]
    brand: String,
    #[arg(
        long,
        env = "KEYGATE_BOOTSTRAP_MODE",
        value_parser = [Mode::Live.as_str(), Mode::Test.as_str()],
        default_value = Mode::Live.as_str()
    )]
    mode: String,
}

pub async fn run(args: BootstrapArgs) -> Result<(), String> {
    let brand = Brand::new(&args.brand).map_err(|e| format!("--brand: {e}"))?;
    let name = bounds::text(&args.name, bounds::MAX_NAME_CHARS, true)
        .map_err(|why| format!("--name: {why}"))?
        .to_owned();
    let mode = Mode::parse(&args.mode).ok_or_else(|| format!("--mode {:?}", args.mode))?;
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
