//! Console forms → the same wire requests the gRPC API takes, so they go
//! through the same validation (`api::validate`) before any service call.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use keygate_proto::v1 as pb;

use crate::error::Error;

/// A submitted form's fields (the last value of a repeated name wins).
pub type Form = HashMap<String, String>;

/// The field's value, trimmed; empty when absent.
pub fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map_or("", |v| v.trim())
}

/// Space- or comma-separated values.
fn list(form: &Form, name: &str) -> Vec<String> {
    field(form, name)
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn number(form: &Form, name: &'static str) -> Result<u32, Error> {
    let v = field(form, name);
    if v.is_empty() {
        return Ok(0);
    }
    v.parse()
        .map_err(|_| Error::invalid(name, "must be a whole number of requests per minute"))
}

/// RFC 3339, or `YYYY-MM-DDTHH:MM[:SS]` read as UTC; empty: none.
fn when(form: &Form, name: &'static str) -> Result<Option<prost_types::Timestamp>, Error> {
    let v = field(form, name);
    if v.is_empty() {
        return Ok(None);
    }
    let t = DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S").map(|t| t.and_utc()))
        .or_else(|_| NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M").map(|t| t.and_utc()))
        .map_err(|_| Error::invalid(name, "must be a time like 2027-01-31T00:00 (UTC)"))?;
    Ok(Some(keygate_proto::convert::timestamp(t)))
}

/// The CreateKey request a "new key" form makes.
pub fn create(form: &Form) -> Result<pb::CreateKeyRequest, Error> {
    let mode = match field(form, "mode") {
        "live" => pb::Mode::Live,
        "test" | "" => pb::Mode::Test,
        _ => return Err(Error::invalid("mode", "must be live or test")),
    };
    let tier = if field(form, "system") == "1" {
        pb::KeyTier::System
    } else {
        pb::KeyTier::Organization
    };
    Ok(pb::CreateKeyRequest {
        name: field(form, "name").to_owned(),
        organization_id: field(form, "organization_id").to_owned(),
        tier: tier.into(),
        mode: mode.into(),
        scopes: list(form, "scopes"),
        allowed_cidrs: list(form, "allowed_cidrs"),
        rate_limit_per_minute: number(form, "rate_limit")?,
        expires_at: when(form, "expires_at")?,
        unlimited: false,
    })
}

/// The UpdateKey request a key page's settings form makes: every field it
/// shows is set (an empty expiry removes it); `unlimited` is left alone.
pub fn update(key_id: String, form: &Form) -> Result<pb::UpdateKeyRequest, Error> {
    Ok(pb::UpdateKeyRequest {
        key_id,
        name: field(form, "name").to_owned(),
        scopes: list(form, "scopes"),
        allowed_cidrs: list(form, "allowed_cidrs"),
        rate_limit_per_minute: number(form, "rate_limit")?,
        expires_at: when(form, "expires_at")?,
        update_mask: Some(prost_types::FieldMask {
            paths: [
                "name",
                "scopes",
                "allowed_cidrs",
                "rate_limit_per_minute",
                "expires_at",
            ]
            .map(String::from)
            .to_vec(),
        }),
        ..Default::default()
    })
}

/// The grace period picked for a rotation.
pub fn grace(form: &Form) -> Result<prost_types::Duration, Error> {
    let d = crate::cli::parse_duration(field(form, "grace"))
        .map_err(|e| Error::invalid("grace_period", e))?;
    Ok(keygate_proto::convert::std_duration(d))
}

/// Whether the form's confirmation box is ticked.
pub fn confirmed(form: &Form) -> bool {
    field(form, "confirm") == "yes"
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn forms_become_wire_requests() {
        let r = create(&form(&[
            ("name", " checkout "),
            ("scopes", "checkout:create, transaction:read"),
            ("mode", "live"),
            ("expires_at", "2027-01-31T00:00"),
        ]))
        .unwrap();
        assert_eq!(r.name, "checkout");
        assert_eq!(r.scopes, ["checkout:create", "transaction:read"]);
        assert_eq!(r.mode(), pb::Mode::Live);
        assert_eq!(r.expires_at.unwrap().seconds, 1_801_353_600);
        let e = create(&form(&[("rate_limit", "many")])).unwrap_err();
        assert!(e.to_string().contains("rate_limit"), "{e}");
        let e = create(&form(&[("expires_at", "soon")])).unwrap_err();
        assert!(e.to_string().contains("expires_at"), "{e}");
    }
}
