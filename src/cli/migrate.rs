//! `keygate migrate`: apply the embedded migrations and exit (for a
//! Kubernetes Job or init container; `serve` also applies them at start).

use clap::Args;

use super::StoreArgs;
use crate::store::{SqlStore, sql_redact};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn run(args: MigrateArgs) -> Result<(), String> {
    let url = args.store.url();
    SqlStore::connect(&url)
        .await
        .map_err(|e| format!("migrating {}: {e}", sql_redact(&url)))?;
    println!("migrations applied to {}", sql_redact(&url));
    Ok(())
}
