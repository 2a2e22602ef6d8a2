//! How much a request may carry: the Authorize fields, checked before any
//! parsing so an oversized request costs a length comparison and nothing
//! else, and the fields of a key, the same for every way a key is made (the
//! admin API, `keygate bootstrap`).

pub use crate::key::MAX_GRACE;
pub use crate::scope::MAX_SCOPES;

/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest revocation reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Most entries in a key's IP allow-list.
pub const MAX_CIDRS: usize = 100;
/// Highest per-key rate limit, in requests per minute.
pub const MAX_RATE_LIMIT: u32 = 1_000_000;
/// Highest organization-wide rate limit, in requests per minute: an
/// organization's keys together may need far more than one key.
pub const MAX_ORGANIZATION_RATE_LIMIT: u32 = 100_000_000;

/// Most entries in `required_scopes`.
pub const MAX_REQUIRED_SCOPES: usize = 32;
/// Longest `required_scopes` entry, in bytes (the scope grammar is stricter still).
pub const MAX_REQUIRED_SCOPE_BYTES: usize = 128;
/// Longest `route`, in bytes ("METHOD /path" for Envoy's Check).
pub const MAX_ROUTE_BYTES: usize = 2048;
/// Longest `ip`, in bytes.
pub const MAX_IP_BYTES: usize = 64;

/// Which field is over its bound, and a message naming the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBound {
    /// The request field, as named on the wire (`required_scopes`, `route`, …).
    pub field: &'static str,
    /// What the bound is and by how much it was exceeded, for the caller.
    pub reason: String,
}

/// Fails on the first field over its bound; looks only at lengths.
pub fn check_authorize(route: &str, ip: &str, required_scopes: &[String]) -> Result<(), OverBound> {
    if required_scopes.len() > MAX_REQUIRED_SCOPES {
        return Err(OverBound {
            field: "required_scopes",
            reason: format!(
                "at most {MAX_REQUIRED_SCOPES} entries, got {}",
                required_scopes.len()
            ),
        });
    }
    if let Some(i) = required_scopes
        .iter()
        .position(|s| s.len() > MAX_REQUIRED_SCOPE_BYTES)
    {
        return Err(OverBound {
            field: "required_scopes",
            reason: format!(
                "entry {i} is {} bytes; each must be at most {MAX_REQUIRED_SCOPE_BYTES} bytes",
                required_scopes[i].len()
            ),
        });
    }
    if route.len() > MAX_ROUTE_BYTES {
        return Err(OverBound {
            field: "route",
            reason: format!(
                "is {} bytes; must be at most {MAX_ROUTE_BYTES} bytes",
                route.len()
            ),
        });
    }
    if ip.len() > MAX_IP_BYTES {
        return Err(OverBound {
            field: "ip",
            reason: format!(
                "is {} bytes; must be at most {MAX_IP_BYTES} bytes",
                ip.len()
            ),
        });
    }
    Ok(())
}

/// `value` trimmed, if it is at most `max_chars` characters without control
/// characters (and not empty when `required`); otherwise what is wrong.
pub fn text(value: &str, max_chars: usize, required: bool) -> Result<&str, String> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_bounded_in_characters() {
        assert_eq!(text("  ops  ", 3, true), Ok("ops"));
        assert_eq!(text(&"é".repeat(3), 3, true), Ok("ééé"));
        assert!(
            text(&"é".repeat(4), 3, true)
                .unwrap_err()
                .contains("at most 3")
        );
        assert_eq!(text(" ", 3, true), Err("must not be empty".into()));
        assert_eq!(text("", 3, false), Ok(""));
        assert!(text("a\nb", 3, true).unwrap_err().contains("control"));
    }

    #[test]
    fn at_each_bound_passes_and_one_past_names_the_field() {
        let scopes = vec!["a".repeat(MAX_REQUIRED_SCOPE_BYTES); MAX_REQUIRED_SCOPES];
        let route = "r".repeat(MAX_ROUTE_BYTES);
        let ip = " ".repeat(MAX_IP_BYTES);
        assert_eq!(check_authorize(&route, &ip, &scopes), Ok(()));

        let too_many = vec!["a:b".to_owned(); MAX_REQUIRED_SCOPES + 1];
        let e = check_authorize("", "", &too_many).unwrap_err();
        assert_eq!(e.field, "required_scopes");
        assert!(e.reason.contains("at most 32 entries"), "{}", e.reason);

        let mut long = scopes.clone();
        long[3].push('a');
        let e = check_authorize("", "", &long).unwrap_err();
        assert_eq!(e.field, "required_scopes");
        assert!(e.reason.contains("entry 3") && e.reason.contains("128 bytes"));

        let e = check_authorize(&format!("{route}r"), "", &[]).unwrap_err();
        assert_eq!(e.field, "route");
        assert!(e.reason.contains("2048 bytes"));

        let e = check_authorize("", &format!("{ip} "), &[]).unwrap_err();
        assert_eq!(e.field, "ip");
        assert!(e.reason.contains("64 bytes"));
    }
}
