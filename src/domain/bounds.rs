//! How much one Authorize request may carry. Checked before any parsing, so
//! an oversized request costs a length comparison and nothing else.

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
    pub field: &'static str,
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

#[cfg(test)]
mod tests {
    use super::*;

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
