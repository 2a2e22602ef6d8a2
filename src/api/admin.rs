//! keygate.v1.KeyAdmin.

use std::sync::Arc;

use keygate_proto::v1::key_admin_server;
use keygate_proto::v1::*;
use tonic::{Request, Response, Status};

use super::{caller, convert, validate};
use crate::service::organizations::OrganizationService;
use crate::service::{Authorizer, Caller, KeyService};

/// KeyAdmin over the key and organization services: each call
/// authenticates its caller, validates the request, calls the service and
/// converts the answer.
pub struct AdminApi {
    authorizer: Arc<Authorizer>,
    keys: Arc<KeyService>,
    organizations: Arc<OrganizationService>,
}

impl AdminApi {
    /// Callers are authenticated by `authorizer`; keys are `keys`',
    /// organization limits `organizations`'.
    pub fn new(
        authorizer: Arc<Authorizer>,
        keys: Arc<KeyService>,
        organizations: Arc<OrganizationService>,
    ) -> Self {
        Self {
            authorizer,
            keys,
            organizations,
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> key_admin_server::KeyAdminServer<Self> {
        key_admin_server::KeyAdminServer::new(self)
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Ok(
            caller::authenticate(&self.authorizer, request.metadata(), request.remote_addr())
                .await?,
        )
    }

    fn api_key(&self, key: &keygate_core::key::KeyRecord) -> ApiKey {
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
        let spec = validate::new_key(request.into_inner())?;
        let (key, token) = self.keys.create(&caller, spec).await?;
        Ok(Response::new(CreateKeyResponse {
            key: Some(self.api_key(&key)),
            token,
        }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = validate::key_id("key_id", &request.get_ref().key_id)?;
        let key = self.keys.get(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let caller = self.caller(&request).await?;
        let spec = validate::list_spec(request.into_inner())?;
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
        let id = validate::key_id("key_id", &r.key_id)?;
        let grace = validate::grace_period(r.grace_period.as_ref())?;
        let wait = validate::replica_wait(r.wait_for_replicas, r.replica_wait_timeout.as_ref())?;
        let (key, token, confirmed_replicas) = self.keys.rotate(&caller, id, grace, wait).await?;
        let previous_secret_expires_at = key
            .previous_secret
            .as_ref()
            .map(|p| keygate_proto::convert::timestamp(p.expires_at));
        Ok(Response::new(RotateKeyResponse {
            key: Some(self.api_key(&key)),
            token,
            previous_secret_expires_at,
            confirmed_replicas,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<RevokeKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let id = validate::key_id("key_id", &r.key_id)?;
        let reason = validate::revoke_reason(&r.reason)?;
        let wait = validate::replica_wait(r.wait_for_replicas, r.replica_wait_timeout.as_ref())?;
        let (key, confirmed_replicas) = self.keys.revoke(&caller, id, reason, wait).await?;
        Ok(Response::new(RevokeKeyResponse {
            key: Some(self.api_key(&key)),
            confirmed_replicas,
        }))
    }

    async fn disable_key(
        &self,
        request: Request<DisableKeyRequest>,
    ) -> Result<Response<DisableKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let id = validate::key_id("key_id", &r.key_id)?;
        let wait = validate::replica_wait(r.wait_for_replicas, r.replica_wait_timeout.as_ref())?;
        let (key, confirmed_replicas) = self.keys.disable(&caller, id, wait).await?;
        Ok(Response::new(DisableKeyResponse {
            key: Some(self.api_key(&key)),
            confirmed_replicas,
        }))
    }

    async fn enable_key(
        &self,
        request: Request<EnableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = validate::key_id("key_id", &request.get_ref().key_id)?;
        let (key, _) = self.keys.enable(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn delete_key(
        &self,
        request: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let id = validate::key_id("key_id", &r.key_id)?;
        let wait = validate::replica_wait(r.wait_for_replicas, r.replica_wait_timeout.as_ref())?;
        let confirmed_replicas = self.keys.delete(&caller, id, wait).await?;
        Ok(Response::new(DeleteKeyResponse { confirmed_replicas }))
    }

    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let id = validate::key_id("key_id", &r.key_id)?;
        let changes = validate::key_changes(r)?;
        let (key, _) = self.keys.update(&caller, id, changes).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn expire_previous_secret(
        &self,
        request: Request<ExpirePreviousSecretRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let caller = self.caller(&request).await?;
        let id = validate::key_id("key_id", &request.get_ref().key_id)?;
        let (key, _) = self.keys.expire_previous_secret(&caller, id).await?;
        Ok(Response::new(self.api_key(&key)))
    }

    async fn list_key_events(
        &self,
        request: Request<ListKeyEventsRequest>,
    ) -> Result<Response<ListKeyEventsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let spec = validate::event_list_spec(request.into_inner())?;
        let (events, next) = self.keys.list_events(&caller, spec).await?;
        Ok(Response::new(ListKeyEventsResponse {
            events: events.iter().map(convert::key_event).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn set_organization_limits(
        &self,
        request: Request<SetOrganizationLimitsRequest>,
    ) -> Result<Response<OrganizationLimits>, Status> {
        let caller = self.caller(&request).await?;
        let (organization_id, per_minute) = validate::organization_limit(request.get_ref())?;
        let limit = self
            .organizations
            .set(&caller, organization_id, per_minute)
            .await?;
        Ok(Response::new(convert::organization_limits(
            &limit.organization_id,
            Some(&limit),
        )))
    }

    async fn get_key_usage(
        &self,
        request: Request<GetKeyUsageRequest>,
    ) -> Result<Response<GetKeyUsageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let spec = validate::usage_spec(request.get_ref())?;
        let range = spec.range;
        let buckets = self.keys.usage(&caller, spec).await?;
        Ok(Response::new(convert::key_usage(&range, &buckets)))
    }

    async fn get_organization_limits(
        &self,
        request: Request<GetOrganizationLimitsRequest>,
    ) -> Result<Response<OrganizationLimits>, Status> {
        let caller = self.caller(&request).await?;
        let organization_id = validate::organization_id(&request.get_ref().organization_id)?;
        let limit = self.organizations.get(&caller, &organization_id).await?;
        Ok(Response::new(convert::organization_limits(
            &organization_id,
            limit.as_ref(),
        )))
    }
}
