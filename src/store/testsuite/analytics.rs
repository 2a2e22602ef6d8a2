//! Usage analytics buckets on both backends: upserts add, reads group and
//! filter, sweeps are bounded.

use chrono::{DateTime, Duration, Utc};
use keygate_core::analytics::{Granularity, Outcome, UsageCount};
use keygate_core::decision::DenyReason;
use uuid::Uuid;

use super::{Backend, Fixture, run};
use crate::store::{UsageAnalytics, UsageQuery};

store_test_suite!(
    usage_counts_add_up_across_flushes,
    usage_rows_filter_by_key_organization_range_and_granularity,
    usage_sweep_deletes_old_rows_in_bounded_batches,
);

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000 / 3600 * 3600, 0).expect("valid")
}

fn count(
    key: Uuid,
    org: Option<&str>,
    granularity: Granularity,
    start: DateTime<Utc>,
    outcome: Outcome,
    n: u64,
) -> UsageCount {
    UsageCount {
        key_id: key,
        organization_id: org.map(str::to_owned),
        granularity,
        start,
        outcome,
        count: n,
    }
}

fn query(granularity: Granularity) -> UsageQuery {
    UsageQuery {
        granularity,
        start: t0() - Duration::days(1),
        end: t0() + Duration::days(1),
        key_id: None,
        organization_id: None,
        limit: 1000,
    }
}

async fn usage_counts_add_up_across_flushes(f: &Fixture) {
    let key = Uuid::new_v4();
    let minute = |outcome, n| count(key, Some("org_a"), Granularity::Minute, t0(), outcome, n);
    f.store
        .add_usage_counts(&[
            minute(None, 5),
            minute(Some(DenyReason::InsufficientScope), 3),
        ])
        .await
        .expect("first flush");
    // Another replica's flush of the same bucket adds to it.
    f.store
        .add_usage_counts(&[minute(None, 2)])
        .await
        .expect("second flush");
    f.store.add_usage_counts(&[]).await.expect("empty flush");
    let rows = f
        .store
        .usage_rows(&query(Granularity::Minute))
        .await
        .expect("rows");
    assert_eq!(
        rows,
        [
            (key, t0(), None, 7),
            (key, t0(), Some(DenyReason::InsufficientScope), 3),
        ]
    );
    assert!(
        f.store
            .usage_rows(&query(Granularity::Hour))
            .await
            .expect("rows")
            .is_empty(),
        "minutes and hours are apart"
    );
}

async fn usage_rows_filter_by_key_organization_range_and_granularity(f: &Fixture) {
    let (a, b, system) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let h = Granularity::Hour;
    f.store
        .add_usage_counts(&[
            count(a, Some("org_a"), h, t0(), None, 1),
            count(a, Some("org_a"), h, t0() + Duration::hours(2), None, 2),
            count(b, Some("org_b"), h, t0(), None, 4),
            count(system, None, h, t0(), None, 8),
        ])
        .await
        .expect("flush");
    let total = |rows: Vec<crate::store::UsageRow>| rows.iter().map(|r| r.3).sum::<u64>();
    let all = f.store.usage_rows(&query(h)).await.expect("all");
    assert_eq!(total(all), 15);
    let only_a = UsageQuery {
        key_id: Some(a),
        ..query(h)
    };
    assert_eq!(total(f.store.usage_rows(&only_a).await.expect("a")), 3);
    let org_b = UsageQuery {
        organization_id: Some("org_b".into()),
        ..query(h)
    };
    assert_eq!(total(f.store.usage_rows(&org_b).await.expect("b")), 4);
    // start inclusive, end exclusive.
    let first_hour = UsageQuery {
        start: t0(),
        end: t0() + Duration::hours(2),
        ..only_a
    };
    assert_eq!(
        f.store.usage_rows(&first_hour).await.expect("range"),
        [(a, t0(), None, 1)]
    );
    let limited = UsageQuery {
        limit: 2,
        ..query(h)
    };
    assert_eq!(f.store.usage_rows(&limited).await.expect("limit").len(), 2);
}

async fn usage_sweep_deletes_old_rows_in_bounded_batches(f: &Fixture) {
    let key = Uuid::new_v4();
    let old: Vec<UsageCount> = (0..5)
        .map(|i| {
            let start = t0() - Duration::minutes(10 + i);
            count(key, None, Granularity::Minute, start, None, 1)
        })
        .collect();
    let mut counts = old.clone();
    counts.push(count(key, None, Granularity::Minute, t0(), None, 1));
    counts.push(count(
        key,
        None,
        Granularity::Hour,
        t0() - Duration::hours(5),
        None,
        1,
    ));
    f.store.add_usage_counts(&counts).await.expect("flush");
    let before = t0() - Duration::minutes(1);
    assert_eq!(
        f.store
            .sweep_usage(Granularity::Minute, before, 3)
            .await
            .expect("sweep"),
        3
    );
    assert_eq!(
        f.store
            .sweep_usage(Granularity::Minute, before, 3)
            .await
            .expect("sweep"),
        2
    );
    assert_eq!(
        f.store
            .sweep_usage(Granularity::Minute, before, 3)
            .await
            .expect("sweep"),
        0
    );
    let left = f
        .store
        .usage_rows(&query(Granularity::Minute))
        .await
        .expect("rows");
    assert_eq!(left, [(key, t0(), None, 1)]);
    assert_eq!(
        f.store
            .usage_rows(&query(Granularity::Hour))
            .await
            .expect("rows")
            .len(),
        1,
        "a minute sweep leaves hours alone"
    );
}
