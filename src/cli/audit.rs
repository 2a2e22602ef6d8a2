//! `keygate audit verify`: checks the event log's hash chain, straight from the store.

use clap::{Args, Subcommand};
use keygate_core::audit::ChainVerifier;

use super::StoreArgs;
use crate::store::{EventLog, SqlStore, sql_redact};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the audit chain and name the first edited, deleted or reordered event.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub async fn run(args: AuditArgs) -> Result<(), String> {
    let AuditCommand::Verify { store } = args.command;
    let url = store.url();
    // As it is: no migrations, no backfill, nothing created.
    let store = SqlStore::open_existing(&url)
        .await
        .map_err(|e| format!("opening {}: {e}", sql_redact(&url)))?;
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let batch = store
            .events_after(after, 1000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = batch.last() else { break };
        after = last.sequence;
        for event in &batch {
            verifier
                .feed(event, event.hash.as_ref())
                .map_err(|broken| {
                    format!(
                        "audit chain broken at event {}: {broken}",
                        broken.sequence()
                    )
                })?;
        }
    }
    println!(
        "audit chain intact: {} events verified",
        verifier.verified()
    );
    Ok(())
}
