//! Allow-list entries in one canonical form.
//!
//! Authorize compares a client's address in canonical form (an IPv4-mapped
//! IPv6 address such as `::ffff:10.1.2.3` is its IPv4 address), so an entry
//! written in mapped form (`::ffff:10.0.0.0/104`) would never match anything:
//! it is stored as the IPv4 network it names (`10.0.0.0/8`).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// The length of the `::ffff:0:0/96` prefix that marks a mapped IPv4 address.
const MAPPED_PREFIX: u8 = 96;

/// `net` with its host bits cleared and, when written as an IPv4-mapped IPv6
/// network, as that IPv4 network. A mapped network shorter than /96 reaches
/// outside the mapped range and names no IPv4 network: an error saying so.
pub fn normalize(net: IpNet) -> Result<IpNet, String> {
    let IpAddr::V6(addr) = net.addr() else {
        return Ok(net.trunc());
    };
    let Some(v4) = addr.to_ipv4_mapped() else {
        return Ok(net.trunc());
    };
    let Some(v4_len) = net.prefix_len().checked_sub(MAPPED_PREFIX) else {
        return Err(format!(
            "{net} is an IPv4-mapped network shorter than /{MAPPED_PREFIX}; write the IPv4 network instead"
        ));
    };
    Ipv4Net::new(v4, v4_len)
        .map(|n| IpNet::V4(n.trunc()))
        .map_err(|e| format!("{net}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, String> {
        normalize(s.parse().unwrap()).map(|n| n.to_string())
    }

    #[test]
    fn mapped_networks_become_ipv4() {
        assert_eq!(norm("::ffff:10.0.0.0/104").unwrap(), "10.0.0.0/8");
        assert_eq!(norm("::ffff:10.1.2.3/104").unwrap(), "10.0.0.0/8");
        assert_eq!(norm("::ffff:1.2.3.4/128").unwrap(), "1.2.3.4/32");
        assert_eq!(norm("::ffff:0.0.0.0/96").unwrap(), "0.0.0.0/0");
        assert!(norm("::ffff:10.0.0.0/95").unwrap_err().contains("/96"));
    }

    #[test]
    fn other_networks_only_lose_host_bits() {
        assert_eq!(norm("10.1.2.3/8").unwrap(), "10.0.0.0/8");
        assert_eq!(norm("2001:db8::1/32").unwrap(), "2001:db8::/32");
        assert_eq!(norm("::/0").unwrap(), "::/0");
        assert_eq!(norm("::1/128").unwrap(), "::1/128");
    }
}
