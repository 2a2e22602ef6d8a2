//! Faults under load: each test runs a bounded, mixed load (Authorize on
//! cached, revoked and uncached keys, admin writes and revocations, Watch
//! subscribers) while PostgreSQL stops, its connections are killed or it
//! turns read-only, a replica is SIGKILLed, a replica is cut off from the
//! database, or the SQLite file cannot be written (read-only, disk full);
//! then checks what every call got, how long it waited, and that the store
//! and the subscribers lost nothing.
//!
//! Each prints what it measured (`cargo test -- faults --nocapture`).

mod cluster;
mod ledger;
mod load;
mod postgres;
mod replicas;
mod sqlite;

use std::time::Duration;

use keygate_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

use crate::harness::{AuthorizerClient, KeyAdminClient, as_key, eventually};
use load::{Call, Keys, Load, ORG, Outcome, Report, SHORT_DEADLINE, Sample, Target};

/// The store timeout every server here runs with: the default.
const STORE_TIMEOUT: Duration = keygate::store::DEFAULT_STORE_TIMEOUT;
/// What an uncached Authorize may wait for a store read slot before that.
const READ_WAIT: Duration = Duration::from_millis(100);
/// Scheduling slack on a busy 2-core machine, on top of the bounds.
const MARGIN: Duration = Duration::from_millis(400);
/// Short enough that a test sees a replica go stale and fail closed.
const STALENESS: Duration = Duration::from_secs(3);
/// High enough that the load is never rate limited.
const RATE_LIMIT: u32 = 1_000_000;

/// Keys for the load: `cached` allowed once through `target` (so in its
/// cache), two revoked and denied once, and `cold` never used.
async fn make_keys(target: &Target, cached: usize, cold: usize) -> Keys {
    let mut admin = KeyAdminClient::connect(target.admin_url.clone())
        .await
        .unwrap();
    let mut authorizer = AuthorizerClient::connect(target.url.clone()).await.unwrap();
    let mut create = async |name: String| {
        let req = pb::CreateKeyRequest {
            name,
            organization_id: ORG.into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            ..Default::default()
        };
        let r = admin
            .create_key(as_key(&target.admin_token, req))
            .await
            .unwrap()
            .into_inner();
        (r.key.unwrap().key_id, r.token)
    };
    let mut keys = Keys::default();
    for i in 0..cached {
        keys.cached.push(create(format!("cached-{i}")).await.1);
    }
    let mut revoked_ids = Vec::new();
    for i in 0..2 {
        let (id, token) = create(format!("revoked-{i}")).await;
        revoked_ids.push(id);
        keys.revoked.push(token);
    }
    for i in 0..cold {
        keys.cold.push(create(format!("cold-{i}")).await);
    }
    let mut admin = KeyAdminClient::connect(target.admin_url.clone())
        .await
        .unwrap();
    for id in revoked_ids {
        let req = pb::RevokeKeyRequest {
            key_id: id,
            reason: "before the fault".into(),
            ..Default::default()
        };
        admin
            .revoke_key(as_key(&target.admin_token, req))
            .await
            .unwrap();
    }
    let ask = |token: &String| pb::AuthorizeRequest {
        token: token.clone(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    };
    for token in &keys.cached {
        // On another replica the key may take a moment to arrive.
        eventually(
            Duration::from_secs(10),
            "a cached key to be allowed",
            || {
                let mut authorizer = authorizer.clone();
                let req = ask(token);
                async move {
                    let r = authorizer.authorize(req).await.ok()?.into_inner();
                    (r.decision() == pb::Decision::Allow).then_some(())
                }
            },
        )
        .await;
    }
    for token in &keys.revoked {
        eventually(
            Duration::from_secs(10),
            "a revoked key to be denied",
            || {
                let mut authorizer = authorizer.clone();
                let req = ask(token);
                async move {
                    let r = authorizer.authorize(req).await.ok()?.into_inner();
                    (r.decision() == pb::Decision::Deny).then_some(())
                }
            },
        )
        .await;
    }
    let _ = &mut authorizer;
    keys
}

/// Waits until every kind of call has succeeded at least once since `since`
/// (an admin write, a cached and an uncached ALLOW) and every subscriber's
/// stream delivers: the load runs.
async fn all_succeeding(load: &Load, since: Instant, within: Duration, what: &str) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let streaming = load.streaming() == load.watchers();
        let samples = load.samples();
        let recent: Vec<&Sample> = samples.iter().filter(|s| s.started >= since).collect();
        let ok = |keep: &dyn Fn(&Sample) -> bool, want: &Outcome| {
            recent.iter().any(|s| keep(s) && &s.outcome == want)
        };
        // Once every uncached key has been allowed, the workers go on with
        // them cached.
        let cold_left = recent.iter().any(|s| s.call.is_uncached());
        if ok(&|s| s.call == Call::Cached, &Outcome::Allow)
            && ok(&|s| s.call.is_uncached() || !cold_left, &Outcome::Allow)
            && ok(&|s| s.call.is_admin(), &Outcome::Done)
            && streaming
        {
            return Instant::now();
        }
        if Instant::now() > deadline {
            let report = Report {
                samples: recent.into_iter().cloned().collect(),
                subscribers: Vec::new(),
                created: Vec::new(),
            };
            let last: Vec<_> = report.samples.iter().rev().take(5).collect();
            panic!(
                "timed out waiting for {what}; {} of {} subscribers streaming; since then: {}; \
                 the last calls: {last:?}",
                load.streaming(),
                load.watchers(),
                report.summary()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No call hung, and none waited longer than the store timeout allows: an
/// Authorize at most the read-slot wait plus one store call, an admin call
/// one store call, a call with a short grpc-timeout no longer than it.
fn assert_bounded_waits(report: &Report) {
    let hung = report.calls(|s| s.outcome == Outcome::Hung);
    assert!(hung.is_empty(), "calls hung: {hung:?}");
    let bound = STORE_TIMEOUT + READ_WAIT + MARGIN;
    let slow = report.calls(|s| !matches!(s.call, Call::Deadline { .. }) && s.took > bound);
    assert!(
        slow.is_empty(),
        "{} calls waited longer than {bound:?}, the longest {:?}: {:?}",
        slow.len(),
        slow.iter().map(|s| s.took).max(),
        slow.iter().take(5).collect::<Vec<_>>()
    );
    let deadline_bound = SHORT_DEADLINE + MARGIN;
    let late = report.calls(|s| matches!(s.call, Call::Deadline { .. }) && s.took > deadline_bound);
    assert!(
        late.is_empty(),
        "calls outlived their {SHORT_DEADLINE:?} grpc-timeout: {late:?}"
    );
}

/// Answers that are wrong whatever happens: an ALLOW for a revoked key, a
/// DENY for a valid one, or an error other than UNAVAILABLE (fail closed
/// says UNAVAILABLE; a call whose grpc-timeout passed first ends with
/// CANCELLED "Timeout expired", which is how tonic's client reports its own
/// deadline, or DEADLINE_EXCEEDED).
fn assert_never_wrong(report: &Report) {
    for s in &report.samples {
        let ok = match (&s.call, &s.outcome) {
            (Call::Revoked, Outcome::Allow) => false,
            (Call::Cached | Call::Cold { .. } | Call::Deadline { .. }, Outcome::Deny(_)) => false,
            (Call::Deadline { .. }, Outcome::Failed(code, _)) => deadline_passed(*code),
            (_, Outcome::Failed(code, _)) => *code == Code::Unavailable,
            _ => true,
        };
        assert!(ok, "a wrong answer: {s:?}");
    }
}

/// What a call with a short grpc-timeout may end with: UNAVAILABLE, or its
/// deadline passing (the tonic client enforces it too, and reports it as
/// CANCELLED; the server drops the call at the same moment).
fn deadline_passed(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Calls that started at or after `from` and ended before `to`.
fn within(s: &Sample, from: Instant, to: Instant) -> bool {
    s.started >= from && s.started + s.took < to
}

fn unavailable(s: &Sample) -> bool {
    match (&s.call, &s.outcome) {
        (Call::Deadline { .. }, Outcome::Failed(code, _)) => deadline_passed(*code),
        (_, Outcome::Failed(code, _)) => *code == Code::Unavailable,
        _ => false,
    }
}

/// After `recovered` (plus a moment for calls already in flight), nothing fails.
fn assert_recovered(report: &Report, recovered: Instant) {
    let after = recovered + Duration::from_millis(200);
    let failed = report.calls(|s| {
        s.started >= after
            && !matches!(s.outcome, Outcome::Allow | Outcome::Done | Outcome::Deny(_))
    });
    assert!(
        failed.is_empty(),
        "{} calls failed after recovery: {:?}",
        failed.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn longest_of(report: &Report, keep: impl Fn(&Sample) -> bool) -> u128 {
    ms(report.longest(keep))
}

/// The figures a test prints for the record.
fn print_figures(test: &str, report: &Report, extra: &str) {
    eprintln!(
        "{test}: {} calls; longest wait: uncached Authorize {} ms, cached {} ms, admin {} ms, \
         with a {} ms grpc-timeout {} ms (store timeout {} ms); subscribers reconnected {:?} times; {extra}\n  {}",
        report.samples.len(),
        longest_of(report, |s| matches!(s.call, Call::Cold { .. })),
        longest_of(report, |s| s.call == Call::Cached),
        longest_of(report, |s| s.call.is_admin()),
        ms(SHORT_DEADLINE),
        longest_of(report, |s| matches!(s.call, Call::Deadline { .. })),
        ms(STORE_TIMEOUT),
        report
            .subscribers
            .iter()
            .map(|s| s.reconnects)
            .collect::<Vec<_>>(),
        report.summary()
    );
}
