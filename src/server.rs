//! Assembles keygate from its settings and serves it.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::admin::AdminApi;
use crate::api::authorizer::AuthorizerApi;
use crate::cache::{CacheSettings, KeyCache};
use crate::domain::clock::Clock;
use crate::domain::policy::RouteTable;
use crate::domain::token::Brand;
use crate::pb;
use crate::service::{Authorizer, KeyService};
use crate::store::{KeyStore, SqlStore, StoreError};

/// Everything `serve` needs besides the listener.
#[derive(Debug)]
pub struct Settings {
    pub database_url: String,
    pub policy: RouteTable,
    pub brand: Brand,
    pub cache: CacheSettings,
}

/// A running keygate's parts, connected to its store.
pub struct Keygate {
    pub authorizer: Arc<Authorizer>,
    pub keys: Arc<KeyService>,
    pub store: Arc<SqlStore>,
}

impl Keygate {
    /// Connects to the store (applying migrations) and builds the services.
    pub async fn open(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let store = Arc::new(SqlStore::connect(&settings.database_url).await?);
        let page_key = store.shared_secret("page_token_key").await?;
        let cache = Arc::new(KeyCache::new(store.clone(), settings.cache));
        let authorizer = Arc::new(Authorizer::new(
            cache.clone(),
            Arc::new(settings.policy),
            clock.clone(),
        ));
        let keys = Arc::new(KeyService::new(
            store.clone(),
            cache,
            clock,
            settings.brand,
            page_key,
        ));
        Ok(Self {
            authorizer,
            keys,
            store,
        })
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then lets
    /// in-flight calls finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let authorizer = AuthorizerApi::new(self.authorizer.clone()).into_server();
        let admin = AdminApi::new(self.authorizer.clone(), self.keys.clone()).into_server();
        // Migrations ran in `open`, so the store has answered by now.
        health
            .set_serving::<pb::keygate::v1::authorizer_server::AuthorizerServer<AuthorizerApi>>()
            .await;
        health
            .set_serving::<pb::keygate::v1::key_admin_server::KeyAdminServer<AdminApi>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("embedded descriptor sets are valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("embedded descriptor sets are valid");

        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(authorizer)
            .add_service(admin)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
    }
}
