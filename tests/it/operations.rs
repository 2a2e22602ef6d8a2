//! Operating keygate: health follows the store, and SIGTERM drains in-flight
//! calls before exiting 0.

use std::time::Duration;

use keygate_proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Backend, TestServer, eventually};
use crate::replicas::{Proxy, Replica, authorize, postgres_addr, via};

async fn health(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_store_is_unreachable() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&a.database_url)).await;
    let b = Replica::start(&via(&a.database_url, proxy.addr), "replica-b", &[]).await;
    assert_eq!(
        health(&b.url(), "keygate.v1.Authorizer").await,
        Some(ServingStatus::Serving)
    );
    proxy.cut();
    eventually(Duration::from_secs(15), "NOT_SERVING", || async {
        (health(&b.url(), "keygate.v1.Authorizer").await == Some(ServingStatus::NotServing))
            .then_some(())
    })
    .await;
    assert_eq!(health(&b.url(), "").await, Some(ServingStatus::NotServing));
    // Alive all the same: a liveness probe must not restart it for this.
    assert_eq!(
        health(&b.url(), keygate::server::LIVENESS_SERVICE).await,
        Some(ServingStatus::Serving)
    );
    proxy.restore();
    eventually(Duration::from_secs(30), "SERVING again", || async {
        (health(&b.url(), "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_in_flight_authorize_finish_then_exits_0() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let mut b = Replica::start(&a.database_url, "replica-b", &["--shutdown-grace", "10s"]).await;
    let mut tokens = Vec::new();
    // As many as B's --store-read-limit (8) lets read the store at once, so
    // each call holds a read of its own.
    for _ in 0..8 {
        tokens.push(a.org_key("org_a", &["checkout:create"]).await.1);
    }
    // Subscribed before the lock: authenticating the subscriber reads the store.
    let mut watch = crate::feed::watch(&b.url(), &a.admin_token, 0).await;
    // Hold every Authorize on B inside its store read: the keys are not
    // cached on B, and the table is locked.
    let pg = sqlx::PgPool::connect(&a.database_url).await.unwrap();
    let mut lock = pg.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let client = b.authorizer().await;
    let calls: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (mut client, t) = (client.clone(), t.clone());
            tokio::spawn(async move { authorize(&mut client, &t).await })
        })
        .collect();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND query LIKE 'SELECT%FROM api_keys WHERE id = $1'";
    eventually(
        Duration::from_secs(10),
        "8 calls waiting in the store",
        || {
            let pg = pg.clone();
            async move {
                (sqlx::query_scalar::<_, i64>(waiting)
                    .fetch_one(&pg)
                    .await
                    .ok()?
                    >= 8)
                    .then_some(())
            }
        },
    )
    .await;

    // A load balancer's health watch, on a connection opened before the signal.
    let mut health_watch = HealthClient::new(
        tonic::transport::Channel::from_shared(b.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .watch(HealthCheckRequest { service: "".into() })
    .await
    .unwrap()
    .into_inner();
    let first = health_watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    b.signal("-TERM");
    // Watch streams end at once, with a status to reconnect on.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(_heartbeat)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable);
    assert!(
        ended.message().contains("after_sequence"),
        "{}",
        ended.message()
    );
    // Draining: it says NOT_SERVING, and the calls are still in flight.
    let next = tokio::time::timeout(Duration::from_secs(10), health_watch.message())
        .await
        .expect("health changes")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(health_watch);
    // No new connections while draining (the calls are still held).
    eventually(
        Duration::from_secs(5),
        "new connections refused",
        || async { health(&b.url(), "").await.is_none().then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    for call in calls {
        let r = call
            .await
            .unwrap()
            .expect("an in-flight call must not fail");
        assert_eq!(r.decision(), pb::Decision::Allow);
    }
    let status = tokio::task::spawn_blocking(move || b.wait()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}
