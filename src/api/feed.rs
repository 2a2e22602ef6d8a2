//! keygate.v1.RevocationFeed.

use std::pin::Pin;
use std::sync::Arc;

use keygate_core::event::{Event, EventKind};
use keygate_core::scope::Scope;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::revocation_feed_server;
use keygate_proto::v1::{
    ListReplicasRequest, ListReplicasResponse, Replica, RevocationEvent, WatchRequest,
};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::caller;
use crate::error::Error;
use crate::feed::FeedItem;
use crate::service::replicas::Replicas;
use crate::service::watch::{WatchSession, Watchers};
use crate::service::{Authorizer, Caller};

/// RevocationFeed: Watch sessions and the replica list, for callers with
/// `revocation:read`.
pub struct FeedApi {
    authorizer: Arc<Authorizer>,
    replicas: Arc<Replicas>,
    watchers: Arc<Watchers>,
    shutdown: CancellationToken,
    read: Scope,
}

impl FeedApi {
    /// Callers are authenticated by `authorizer`; Watch sessions run in
    /// `watchers` until `shutdown`.
    pub fn new(
        authorizer: Arc<Authorizer>,
        replicas: Arc<Replicas>,
        watchers: Arc<Watchers>,
        shutdown: CancellationToken,
    ) -> Self {
        let read = Scope::parse("revocation:read").expect("built-in scope parses");
        Self {
            authorizer,
            replicas,
            watchers,
            shutdown,
            read,
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> revocation_feed_server::RevocationFeedServer<Self> {
        revocation_feed_server::RevocationFeedServer::new(self)
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let caller =
            caller::authenticate(&self.authorizer, request.metadata(), request.remote_addr())
                .await?;
        caller.require(&self.read)?;
        Ok(caller)
    }
}

/// The feed's kind for an event, or `None` for events that invalidate nothing
/// a gateway would cache (a creation, an enable).
pub fn feed_kind(kind: EventKind) -> Option<Kind> {
    match kind {
        EventKind::Revoked => Some(Kind::Revoked),
        EventKind::Disabled => Some(Kind::Disabled),
        EventKind::Deleted => Some(Kind::Deleted),
        EventKind::Rotated => Some(Kind::Rotated),
        EventKind::Updated => Some(Kind::Updated),
        EventKind::SecretExpired => Some(Kind::ExpiredSecret),
        EventKind::Created | EventKind::Enabled => None,
    }
}

fn event_message(e: &Event, kind: Kind) -> RevocationEvent {
    RevocationEvent {
        sequence: e.sequence,
        kind: kind.into(),
        key_id: e.key_id.to_string(),
        organization_id: e.organization_id.clone().unwrap_or_default(),
        at: Some(keygate_proto::convert::timestamp(e.at)),
    }
}

fn marker(sequence: i64, kind: Kind) -> RevocationEvent {
    RevocationEvent {
        sequence,
        kind: kind.into(),
        at: Some(keygate_proto::convert::timestamp(chrono::Utc::now())),
        ..Default::default()
    }
}

/// What the subscriber gets for one item of its session, if anything.
fn message(
    session: &WatchSession,
    item: Result<FeedItem, Error>,
) -> Option<Result<RevocationEvent, Status>> {
    match item {
        Ok(FeedItem::Event(e)) if session.caller().can_see(e.organization_id.as_deref()) => {
            feed_kind(e.kind).map(|kind| Ok(event_message(&e, kind)))
        }
        Ok(FeedItem::Event(_)) => None,
        Ok(FeedItem::Heartbeat(seq)) => Some(Ok(marker(seq, Kind::Heartbeat))),
        Ok(FeedItem::Reset(seq)) => Some(Ok(marker(seq, Kind::Reset))),
        Ok(FeedItem::Closing(seq)) => Some(Err(Status::unavailable(format!(
            "feed closing; reconnect with after_sequence = {seq}"
        )))),
        Err(e) => Some(Err(e.into())),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl revocation_feed_server::RevocationFeed for FeedApi {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = self.caller(&request).await?;
        let after = request.get_ref().after_sequence;
        if after < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative").into());
        }
        let token = caller::credential(request.metadata()).unwrap_or_default();
        let peer = request.remote_addr().map(|a| a.ip());
        let session = self.watchers.open(
            caller,
            token,
            peer,
            after,
            self.read.clone(),
            self.shutdown.clone(),
        )?;
        let stream = futures_util::stream::unfold(session, |mut session| async move {
            let item = session.next().await?;
            Some((message(&session, item), session))
        })
        .filter_map(|message| message);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_replicas(
        &self,
        request: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        self.caller(&request).await?;
        let (replicas, head) = self.replicas.list().await?;
        Ok(Response::new(ListReplicasResponse {
            replicas: replicas
                .into_iter()
                .map(|r| Replica {
                    replica_id: r.status.replica_id.to_string(),
                    name: r.status.name,
                    applied_sequence: r.status.applied_sequence,
                    lag: r.lag,
                    heartbeat_at: Some(keygate_proto::convert::timestamp(r.status.heartbeat_at)),
                    live: r.live,
                })
                .collect(),
            head_sequence: head,
        }))
    }
}
