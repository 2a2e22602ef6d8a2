//! Scenario 7, admin writes: CreateKey and RevokeKey throughput and p99 on
//! PostgreSQL with one and eight concurrent callers, so the lock that orders
//! the event log shows. No target is set: the figures are for the record.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keygate_proto::v1 as pb;

use crate::Ctx;
use crate::load::{self, Call, Stats, call};
use crate::outcome::{Outcome, Table, Target, thousands};
use crate::server::{Database, Keygate, as_key, bootstrap, create_key, migrate};

fn creates(channels: &[tonic::transport::Channel], admin: &str) -> Call {
    let channels: Arc<[_]> = channels.into();
    let admin = admin.to_owned();
    call(move |n| {
        let channel = channels[n as usize % channels.len()].clone();
        let admin = admin.clone();
        async move { create_key(&channel, &admin, "org_admin").await.map(drop) }
    })
}

/// RevokeKey on the next bulk-loaded key (each key is revoked once).
fn revokes(
    channels: &[tonic::transport::Channel],
    admin: &str,
    ids: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
) -> Call {
    let channels: Arc<[_]> = channels.into();
    let admin = admin.to_owned();
    call(move |n| {
        let channel = channels[n as usize % channels.len()].clone();
        let i = next.fetch_add(1, Ordering::Relaxed);
        let id = ids.get(i).cloned();
        let admin = admin.clone();
        async move {
            let id = id.ok_or("no key left to revoke")?;
            pb::key_admin_client::KeyAdminClient::new(channel)
                .revoke_key(as_key(
                    &admin,
                    pb::RevokeKeyRequest {
                        key_id: id,
                        reason: "bench".into(),
                        ..Default::default()
                    },
                )?)
                .await
                .map(drop)
                .map_err(|s| format!("revoke: {:?} {}", s.code(), s.message()))
        }
    })
}

pub async fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let db = Database::postgres().await?;
    let result = measure(ctx, &db).await;
    db.drop_now().await;
    result
}

async fn measure(ctx: &Ctx, db: &Database) -> Result<Outcome, String> {
    migrate(db).await?;
    // Keys to revoke, loaded with SQL: more than the revocations can use.
    let pool = ctx.pick(300_000, 20_000);
    let ids: Vec<String> = crate::bulk::load(db, pool, pool)
        .await?
        .keys
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let admin = bootstrap(db).await?;
    let server = Keygate::start(db, &[]).await?;
    let channels = server.channels(ctx.connections).await?;
    let create = creates(&channels, &admin);
    let revoke = revokes(&channels, &admin, ids, next.clone());

    let mut table = Table::latency("Closed loop, alternating");
    let mut rps: [[Vec<f64>; 2]; 2] = Default::default();
    let mut last: [[Option<Stats>; 2]; 2] = Default::default();
    for round in 1..=ctx.rounds {
        for (ci, callers) in [1usize, 8].into_iter().enumerate() {
            for (oi, (name, op)) in [("CreateKey", &create), ("RevokeKey", &revoke)]
                .into_iter()
                .enumerate()
            {
                let s = load::closed(op, callers, ctx.phases).await;
                s.expect_no_errors(name)?;
                table.stats(&format!("{name}, {callers} caller(s) #{round}"), &s);
                rps[oi][ci].push(s.rps());
                last[oi][ci] = Some(s);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut targets = Vec::new();
    for (oi, name) in ["CreateKey", "RevokeKey"].into_iter().enumerate() {
        let (one, eight) = (mean(&rps[oi][0]), mean(&rps[oi][1]));
        targets.push(Target::new(
            &format!("{name}: throughput with 8 callers ÷ with 1"),
            "(none set)",
            format!(
                "{:.2} ({} ÷ {} calls/s)",
                eight / one,
                thousands(eight),
                thousands(one)
            ),
            None,
        ));
        for (ci, callers) in [1, 8].into_iter().enumerate() {
            if let Some(s) = &last[oi][ci] {
                targets.push(Target::new(
                    &format!("{name}: p99 with {callers} caller(s), last round"),
                    "(none set)",
                    format!("{:.2} ms", s.ms(0.99)),
                    None,
                ));
            }
        }
    }
    server.stop().await;
    Ok(Outcome {
        number: 7,
        name: "admin".into(),
        method: format!(
            "keygate on PostgreSQL as its own process. CreateKey makes ORGANIZATION keys of \
             one organization; RevokeKey revokes keys bulk-loaded beforehand ({pool}), each \
             once. Every write appends to the event log in the same transaction. {} rounds; \
             1 and 8 callers over {} HTTP/2 connections.",
            ctx.rounds, ctx.connections
        ),
        quick: ctx.quick,
        tables: vec![table],
        targets,
        charts: Vec::new(),
        notes: vec![format!(
            "{} keys revoked in all.",
            thousands(next.load(Ordering::Relaxed) as f64)
        )],
    })
}
