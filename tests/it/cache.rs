//! The key cache is bounded in bytes: keys with many scopes and CIDRs weigh
//! what they take, so caching many of them stays within the budget.

use std::sync::Arc;
use std::time::Duration;

use keygate::cache::{CacheSettings, Freshness, KeyCache, record_weight};
use keygate::store::KeyStore;
use keygate_core::event::{Actor, EventKind, NewEvent};
use keygate_core::key::{KeyRecord, KeyState, Mode, Tier};
use keygate_core::scope::ScopeSet;
use keygate_core::token::{Brand, generate};

use crate::harness::{Backend, TestServer};
use crate::on_both_backends;

/// A key at the request limits: 100 long scopes and 100 CIDRs.
fn large_key() -> KeyRecord {
    let id = uuid::Uuid::new_v4();
    let token = generate(&Brand::default(), Mode::Live, id).unwrap();
    let scopes: Vec<String> = (0..100)
        .map(|i| format!("resource_with_a_rather_long_name_{i:03}:read"))
        .collect();
    KeyRecord {
        id,
        name: "n".repeat(200),
        organization_id: Some("org_large".into()),
        tier: Tier::Organization,
        mode: Mode::Live,
        prefix: token.prefix,
        secret_digest: token.digest,
        previous_secret: None,
        scopes: ScopeSet::parse(&scopes).unwrap(),
        allowed_cidrs: (0..100)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect(),
        rate_limit_per_minute: 0,
        unlimited: false,
        state: KeyState::Active,
        created_at: chrono::Utc::now(),
        last_used_at: None,
        expires_at: None,
        rotated_at: None,
        created_by: "bootstrap".into(),
        version: 1,
    }
}

/// Writes `key` to the server's store as its bootstrap creation.
async fn store_key(s: &TestServer, key: &KeyRecord) {
    let event = NewEvent {
        kind: EventKind::Created,
        key_id: key.id,
        organization_id: key.organization_id.as_deref().map(str::to_owned),
        actor: Actor::Bootstrap,
        at: key.created_at,
        reason: String::new(),
        details: String::new(),
    };
    s.store.insert_key(key, &event).await.unwrap();
}

async fn caching_many_large_keys_stays_within_the_byte_budget(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let budget = 1024 * 1024;
    let cache = KeyCache::new(
        s.store.clone(),
        CacheSettings {
            max_bytes: budget,
            ..CacheSettings::default()
        },
        Arc::new(Freshness::new(Duration::from_secs(60))),
        s.cache.key_ids().clone(),
    );
    let mut ids = Vec::new();
    for _ in 0..200 {
        let key = large_key();
        store_key(&s, &key).await;
        ids.push(key.id);
    }
    let one = cache.get(ids[0]).await.unwrap().unwrap();
    // The weight is honest: at least the text and addresses it holds.
    let text: usize = one
        .scopes
        .iter()
        .map(|s| s.to_string().len())
        .sum::<usize>()
        + one.name.len()
        + one.allowed_cidrs.len() * std::mem::size_of::<ipnet::IpNet>();
    assert!(
        record_weight(&one) as usize > text,
        "{}",
        record_weight(&one)
    );
    for id in &ids {
        assert!(cache.get(*id).await.unwrap().is_some());
    }
    let (entries, bytes) = cache.memory();
    assert!(
        bytes <= budget,
        "{bytes} bytes cached over a {budget}-byte budget"
    );
    assert!(
        entries < 200,
        "{entries}: large keys must have been evicted"
    );
    assert!(
        bytes > budget / 2,
        "{bytes}: the budget is used, not wasted"
    );
}

async fn cached_keys_of_one_organization_share_its_id_and_their_scopes(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let cache = KeyCache::new(
        s.store.clone(),
        CacheSettings::default(),
        Arc::new(Freshness::new(Duration::from_secs(60))),
        s.cache.key_ids().clone(),
    );
    let mut keys = Vec::new();
    for _ in 0..3 {
        let key = large_key();
        store_key(&s, &key).await;
        keys.push(cache.get(key.id).await.unwrap().unwrap());
    }
    let org = |k: &KeyRecord| Arc::clone(k.organization_id.as_ref().unwrap());
    for other in &keys[1..] {
        assert!(Arc::ptr_eq(&org(&keys[0]), &org(other)));
        assert!(keys[0].scopes.shares_with(&other.scopes));
    }
    // Shared, still what was stored.
    assert_eq!(&*org(&keys[2]), "org_large");
    assert_eq!(keys[2].scopes, large_key().scopes);
    assert!(!keys[0].scopes.shares_with(&large_key().scopes));
}

on_both_backends!(
    caching_many_large_keys_stays_within_the_byte_budget,
    cached_keys_of_one_organization_share_its_id_and_their_scopes,
);
