//! keygate.v1.KeyAdmin.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::pb::keygate::v1::key_admin_server;
use crate::pb::keygate::v1::*;
use crate::service::{Authorizer, Caller, KeyService};

pub struct AdminApi {
    authorizer: Arc<Authorizer>,
    keys: Arc<KeyService>,
}

impl AdminApi {
    pub fn new(authorizer: Arc<Authorizer>, keys: Arc<KeyService>) -> Self {
        Self { authorizer, keys }
    }

    pub fn into_server(self) -> key_admin_server::KeyAdminServer<Self> {
        key_admin_server::KeyAdminServer::new(self)
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Ok(
            caller::authenticate(&self.authorizer, request.metadata(), request.remote_addr())
                .await?,
        )
    }

    fn api_key(&self, key: &crate::domain::key::KeyRecord) -> ApiKey {
        convert::api_key(key, self.keys.now())
    }
}

#[tonic::async_trait]
impl key_admin_server::KeyAdmin for AdminApi {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let spec = convert::new_key(request.into_inner())?;
        let (key, token) = self.keys.create(&caller, spec).await?;
        Ok(Response::new(CreateKeyResponse {
            key: Some(self.api_key(&key)),
            token,
        }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = convert::key_id("key_id", &request.get_ref().key_id)?;
        let key = self.keys.get(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let caller = self.caller(&request).await?;
        let spec = convert::list_spec(request.into_inner())?;
        let (keys, next) = self.keys.list(&caller, spec).await?;
        Ok(Response::new(ListKeysResponse {
            keys: keys.iter().map(|k| self.api_key(k)).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let id = convert::key_id("key_id", &r.key_id)?;
        let grace = convert::grace_period(r.grace_period.as_ref())?;
        let (key, token) = self.keys.rotate(&caller, id, grace).await?;
        let previous_secret_expires_at = key
            .previous_secret
            .as_ref()
            .map(|p| convert::timestamp(p.expires_at));
        Ok(Response::new(RotateKeyResponse {
            key: Some(self.api_key(&key)),
            token,
            previous_secret_expires_at,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let id = convert::key_id("key_id", &r.key_id)?;
        let reason = convert::revoke_reason(&r.reason)?;
        let key = self.keys.revoke(&caller, id, reason).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn disable_key(
        &self,
        request: Request<DisableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = convert::key_id("key_id", &request.get_ref().key_id)?;
        let key = self.keys.disable(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn enable_key(
        &self,
        request: Request<EnableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = convert::key_id("key_id", &request.get_ref().key_id)?;
        let key = self.keys.enable(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn delete_key(
        &self,
        request: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let id = convert::key_id("key_id", &request.get_ref().key_id)?;
        self.keys.delete(&caller, id).await?;
        Ok(Response::new(DeleteKeyResponse {}))
    }
}
