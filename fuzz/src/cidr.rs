//! CIDR and IP parsing (as the admin API reads an allow-list entry),
//! `keygate_core::cidr::normalize`, and how `decision::ip_allowed` matches a
//! client's address against a key's allow-list.
//!
//! - A parsed network prints and parses back to itself; so does an address.
//! - `normalize` clears host bits, is idempotent, turns an IPv4-mapped
//!   network of /96 or longer into its IPv4 network, and refuses a mapped
//!   one shorter than /96 (it names no IPv4 network).
//! - An allow-list admits a client exactly when one entry, as the operator
//!   wrote it, contains the client's address in canonical form: an IPv4
//!   network or a mapped one contains an IPv4 client (whether it connected as
//!   IPv4 or IPv4-mapped IPv6), any other IPv6 network contains IPv6
//!   clients. An empty list admits everyone, a non-empty one no unknown
//!   address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use ipnet::IpNet;
use keygate_core::cidr::normalize;
use keygate_core::decision::ip_allowed;
use keygate_core::key::KeyRecord;

use super::Few;

/// An allow-list entry as an operator might write it.
#[derive(Debug, Clone, Arbitrary)]
pub enum Entry {
    V4 {
        addr: u32,
        len: u8,
    },
    V6 {
        addr: u128,
        len: u8,
    },
    /// `::ffff:a.b.c.d/len`.
    Mapped {
        addr: u32,
        len: u8,
    },
    /// An address alone, meaning just it.
    Address(IpAddr),
    Raw(String),
}

impl Entry {
    pub fn text(&self) -> String {
        match self {
            Entry::V4 { addr, len } => format!("{}/{}", Ipv4Addr::from(*addr), len % 33),
            Entry::V6 { addr, len } => format!("{}/{}", Ipv6Addr::from(*addr), len % 129),
            Entry::Mapped { addr, len } => {
                format!("::ffff:{}/{}", Ipv4Addr::from(*addr), len % 129)
            }
            Entry::Address(addr) => addr.to_string(),
            Entry::Raw(text) => text.clone(),
        }
    }
}

/// A client's address: anything, or one inside an entry.
#[derive(Debug, Clone, Arbitrary)]
pub enum Client {
    Unknown,
    Address(IpAddr),
    /// The IPv4-mapped IPv6 form of an IPv4 address.
    Mapped(u32),
    /// Entry `index` (modulo the list) with these host bits.
    Inside {
        index: usize,
        host: u128,
        mapped: bool,
    },
}

impl Client {
    pub fn address(&self, entries: &[IpNet]) -> Option<IpAddr> {
        match *self {
            Client::Unknown => None,
            Client::Address(addr) => Some(addr),
            Client::Mapped(v4) => Some(IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped())),
            Client::Inside {
                index,
                host,
                mapped,
            } => {
                let net = entries.get(index.checked_rem(entries.len())?)?;
                Some(match net {
                    IpNet::V4(n) => {
                        let host = (host as u32) & !mask32(n.prefix_len());
                        let v4 = Ipv4Addr::from(u32::from(n.network()) | host);
                        if mapped {
                            IpAddr::V6(v4.to_ipv6_mapped())
                        } else {
                            IpAddr::V4(v4)
                        }
                    }
                    IpNet::V6(n) => {
                        let host = host & !mask128(n.prefix_len());
                        IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
                    }
                })
            }
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// An entry parsed as the admin API parses it: a CIDR, or an address
/// meaning just that address, around blanks.
pub fn parse_entry(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether `written` (an entry as parsed, before normalising) admits
/// `client`, by the rule in this module's doc; plain bit arithmetic.
pub fn admits(written: IpNet, client: IpAddr) -> bool {
    let client = match client {
        IpAddr::V6(a) => match a.octets() {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            _ => client,
        },
        v4 => v4,
    };
    match (written, client) {
        (IpNet::V4(net), IpAddr::V4(c)) => {
            let mask = mask32(net.prefix_len());
            u32::from(net.addr()) & mask == u32::from(c) & mask
        }
        (IpNet::V6(net), client) => {
            let mask = mask128(net.prefix_len());
            let mapped_range = net.prefix_len() >= 96 && u128::from(net.addr()) >> 32 == 0xffff;
            let c = match client {
                IpAddr::V4(c) if mapped_range => u128::from(c.to_ipv6_mapped()),
                IpAddr::V4(_) => return false,
                IpAddr::V6(c) => u128::from(c),
            };
            u128::from(net.addr()) & mask == c & mask
        }
        (IpNet::V4(_), IpAddr::V6(_)) => false,
    }
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub entries: Few<Entry, 3>,
    pub client: Client,
}

/// The target: each line of `text` is an allow-list entry too.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    let key = super::decision::plain_key();
    let lines: Vec<&str> = text.lines().take(16).collect();
    for line in &lines {
        check_address_text(line);
    }
    let written: Vec<IpNet> = input
        .entries
        .items()
        .iter()
        .map(Entry::text)
        .chain(lines.iter().map(|l| (*l).to_owned()))
        .filter_map(|e| parse_entry(&e))
        .filter(|net| check_normalize(*net).is_some())
        .collect();
    let client = input.client.address(&written);
    if let Some(addr) = client {
        check_address_text(&addr.to_string());
    }
    check_allow_list(&key, &written, client);
}

/// An address prints and parses back to itself.
pub fn check_address_text(text: &str) {
    if let Ok(addr) = text.trim().parse::<IpAddr>() {
        assert_eq!(addr.to_string().parse::<IpAddr>(), Ok(addr));
    }
    if let Some(net) = parse_entry(text) {
        assert_eq!(net.to_string().parse::<IpNet>(), Ok(net));
    }
}

/// `normalize`'s promises for one parsed entry; its result, if any.
pub fn check_normalize(net: IpNet) -> Option<IpNet> {
    let mapped = match net {
        IpNet::V6(n) => n.addr().to_ipv4_mapped().is_some(),
        IpNet::V4(_) => false,
    };
    match normalize(net) {
        Err(_) => {
            assert!(mapped && net.prefix_len() < 96, "{net} is refused");
            None
        }
        Ok(n) => {
            assert!(!mapped || net.prefix_len() >= 96, "{net} is accepted");
            assert_eq!(n, n.trunc(), "{net}: no host bits");
            assert_eq!(normalize(n), Ok(n), "{net}: idempotent");
            assert_eq!(n.to_string().parse::<IpNet>(), Ok(n));
            match n {
                IpNet::V4(_) => assert!(net.addr().is_ipv4() || mapped),
                IpNet::V6(v6) => {
                    assert!(!mapped, "{net}: a mapped network becomes IPv4");
                    assert!(v6.addr().to_ipv4_mapped().is_none());
                }
            }
            Some(n)
        }
    }
}

/// `ip_allowed` with `key`'s allow-list set to `written`, normalised as the
/// admin API stores it, agrees with [`admits`].
pub fn check_allow_list(key: &KeyRecord, written: &[IpNet], client: Option<IpAddr>) {
    let mut key = key.clone();
    key.allowed_cidrs = written.iter().filter_map(|n| normalize(*n).ok()).collect();
    let allowed = ip_allowed(&key, client);
    let expected = match client {
        _ if written.is_empty() => true,
        None => false,
        Some(addr) => written.iter().any(|net| admits(*net, addr)),
    };
    assert_eq!(allowed, expected, "{written:?} admits {client:?}");
    if let Some(IpAddr::V4(v4)) = client {
        let mapped = Some(IpAddr::V6(v4.to_ipv6_mapped()));
        assert_eq!(ip_allowed(&key, mapped), allowed, "{v4} as IPv4-mapped");
    }
}
