//! API tokens: `<brand>_<mode>_<key id><secret><checksum>`.
//!
//! - brand: 1–16 lowercase letters or digits, starting with a letter (`kg`, `ck`, `op`)
//! - mode: `live` or `test`
//! - key id: the key's UUID as 22 base62 characters, so the store is read by primary key
//! - secret: 43 base62 characters from the OS CSPRNG (over 256 bits)
//! - checksum: CRC32 of everything before it, as 6 base62 characters, so typos and
//!   random strings are rejected without touching the store and scanners can
//!   recognise a keygate token
//!
//! The whole token is base62 plus `_`: URL- and header-safe, 79 characters with
//! the default brand and at most 93 with the longest.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::key::Mode;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_LEN: usize = 22;
const SECRET_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
const BODY_LEN: usize = ID_LEN + SECRET_LEN + CHECKSUM_LEN;
const MAX_BRAND_LEN: usize = 16;

/// Longest input Authorize will even look at; longer is INVALID_TOKEN without a store read.
pub const MAX_TOKEN_INPUT: usize = 1024;

/// The brand of tokens when none is configured: tokens look like `kg_live_…`.
pub const DEFAULT_BRAND: &str = "kg";

/// The token brand, validated: 1–16 lowercase ASCII letters or digits, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brand(String);

impl Brand {
    /// Fails with a message naming what is wrong.
    pub fn new(brand: &str) -> Result<Self, String> {
        if is_brand(brand) {
            Ok(Self(brand.to_owned()))
        } else {
            Err(format!(
                "brand {brand:?} must be 1-{MAX_BRAND_LEN} lowercase letters or digits, starting with a letter"
            ))
        }
    }

    /// The brand as tokens spell it, before the first `_`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Brand {
    fn default() -> Self {
        Self(DEFAULT_BRAND.to_owned())
    }
}

fn is_brand(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_BRAND_LEN
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// SHA-256 of a secret: the only form in which a secret is stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretDigest(pub [u8; 32]);

impl SecretDigest {
    /// The digest of `secret`'s UTF-8 bytes.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Constant-time comparison, so timing does not reveal how much of a digest matched.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(..)")
    }
}

/// A freshly generated token. Its `Debug` never shows the secret.
pub struct NewToken {
    /// The whole token, secret included: hand it to the key's owner once
    /// and keep it nowhere.
    pub token: String,
    /// `<brand>_<mode>_<key id>`, as [`KeyRecord::prefix`](crate::key::KeyRecord::prefix) stores it.
    pub prefix: String,
    /// The digest of the token's secret, as the key stores it.
    pub digest: SecretDigest,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why a string is not a well-formed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Nothing was presented.
    Missing,
    /// Too long, wrong shape, or a bad checksum.
    Malformed,
}

/// A token that passed the format and checksum checks; its secret is still unverified.
#[derive(Clone, Copy)]
pub struct ParsedToken<'a> {
    /// The key the token names (not yet shown to exist).
    pub key_id: Uuid,
    /// The mode the token claims; the stored prefix must agree.
    pub mode: Mode,
    /// brand, mode and key id: compared with the stored prefix.
    pub prefix: &'a str,
    secret: &'a str,
}

impl std::fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<'a> ParsedToken<'a> {
    /// Parses a presented credential; a leading `Bearer ` is accepted. Does no I/O
    /// and no allocation.
    pub fn parse(input: &'a str) -> Result<Self, TokenError> {
        if input.len() > MAX_TOKEN_INPUT {
            return Err(TokenError::Malformed);
        }
        let token = strip_bearer(input).trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let (brand, rest) = token.split_once('_').ok_or(TokenError::Malformed)?;
        if !is_brand(brand) {
            return Err(TokenError::Malformed);
        }
        let (mode, body) = if let Some(body) = rest.strip_prefix("live_") {
            (Mode::Live, body)
        } else if let Some(body) = rest.strip_prefix("test_") {
            (Mode::Test, body)
        } else {
            return Err(TokenError::Malformed);
        };
        if body.len() != BODY_LEN || !body.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(TokenError::Malformed);
        }
        let (checked, checksum) = token.split_at(token.len() - CHECKSUM_LEN);
        let expected = decode_base62(checksum.as_bytes()).ok_or(TokenError::Malformed)?;
        if expected != u128::from(crc32fast::hash(checked.as_bytes())) {
            return Err(TokenError::Malformed);
        }
        let id = decode_base62(&body.as_bytes()[..ID_LEN]).ok_or(TokenError::Malformed)?;
        let prefix_len = token.len() - BODY_LEN + ID_LEN;
        Ok(Self {
            key_id: Uuid::from_u128(id),
            mode,
            prefix: &token[..prefix_len],
            secret: &body[ID_LEN..ID_LEN + SECRET_LEN],
        })
    }

    /// The digest of the presented secret, to compare with the stored ones.
    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(self.secret)
    }

    /// What a long-lived session keeps of this token to check it again later.
    pub fn credential(&self) -> Credential {
        Credential {
            key_id: self.key_id,
            prefix: self.prefix.to_owned(),
            digest: self.digest(),
        }
    }
}

/// A presented token as a session keeps it: key id, prefix and the digest of
/// the secret, never the secret itself. Its `Debug` shows no digest.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The key the token names.
    pub key_id: Uuid,
    /// The token's `<brand>_<mode>_<key id>`.
    pub prefix: String,
    /// The digest of the token's secret.
    pub digest: SecretDigest,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The headers that carry a key unless configured otherwise, in order of
/// preference: `Authorization: Bearer <key>` (OwnPay, Paymenter) and
/// `X-API-Key: <key>` (CertoPay).
pub const DEFAULT_CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// The credential of a request: the first of `names` whose value, without
/// a leading `Bearer `, is not blank. `get` reads a header by its
/// lower-case name. Admin calls, Watch and Envoy's Check all take their
/// caller's key through this one function.
pub fn find_credential<'a, N: AsRef<str>>(
    names: &[N],
    get: impl Fn(&str) -> Option<&'a str>,
) -> Option<&'a str> {
    names
        .iter()
        .filter_map(|name| get(name.as_ref()))
        .map(|value| strip_bearer(value.trim_start()).trim())
        .find(|token| !token.is_empty())
}

/// Strips a leading `Bearer ` (any case), as sent in an Authorization header.
pub fn strip_bearer(input: &str) -> &str {
    match input.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => &input[7..],
        _ => input,
    }
}

/// The key id a whole prefix (`<brand>_<mode>_<22 characters>`, as
/// [`prefix_for`] makes it and keys show it) names; `None` for anything
/// else. The prefix is public: this only saves looking it up.
pub fn key_id_of_prefix(prefix: &str) -> Option<Uuid> {
    let (brand, rest) = prefix.trim().split_once('_')?;
    let body = rest
        .strip_prefix("live_")
        .or_else(|| rest.strip_prefix("test_"))?;
    if !is_brand(brand) || body.len() != ID_LEN {
        return None;
    }
    decode_base62(body.as_bytes()).map(Uuid::from_u128)
}

/// The public beginning of a key's tokens: `<brand>_<mode>_<key id>`.
pub fn prefix_for(brand: &Brand, mode: Mode, key_id: Uuid) -> String {
    let mut prefix = String::with_capacity(brand.0.len() + 6 + ID_LEN);
    prefix.push_str(&brand.0);
    prefix.push('_');
    prefix.push_str(mode.as_str());
    prefix.push('_');
    push_base62(&mut prefix, key_id.as_u128(), ID_LEN);
    prefix
}

/// For display: the prefix and a mask, never any part of the secret.
pub fn masked(prefix: &str) -> String {
    format!("{prefix}...****")
}

/// Generates a token for `key_id` with a new secret from the OS CSPRNG.
pub fn generate(brand: &Brand, mode: Mode, key_id: Uuid) -> Result<NewToken, getrandom::Error> {
    let prefix = prefix_for(brand, mode, key_id);
    let mut secret = String::with_capacity(SECRET_LEN);
    let mut buf = [0u8; 64];
    while secret.len() < SECRET_LEN {
        getrandom::fill(&mut buf)?;
        // Rejection sampling keeps every character uniform: 248 = 4 * 62.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if secret.len() == SECRET_LEN {
                break;
            }
            secret.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    let digest = SecretDigest::of(&secret);
    let mut token = String::with_capacity(prefix.len() + SECRET_LEN + CHECKSUM_LEN);
    token.push_str(&prefix);
    token.push_str(&secret);
    let crc = crc32fast::hash(token.as_bytes());
    push_base62(&mut token, u128::from(crc), CHECKSUM_LEN);
    Ok(NewToken {
        token,
        prefix,
        digest,
    })
}

fn push_base62(out: &mut String, mut value: u128, width: usize) {
    let mut digits = [b'0'; ID_LEN];
    for slot in digits[..width].iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

fn decode_base62(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u128::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_blank_credential_header_wins() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        };
        let names = DEFAULT_CREDENTIAL_HEADERS;
        assert_eq!(
            find_credential(&names, headers(&[("authorization", "Bearer kg_a")])),
            Some("kg_a")
        );
        assert_eq!(
            find_credential(&names, headers(&[("x-api-key", "kg_b")])),
            Some("kg_b")
        );
        // A bare or blank Authorization does not hide an X-API-Key.
        assert_eq!(
            find_credential(
                &names,
                headers(&[("authorization", "Bearer "), ("x-api-key", "bearer kg_c")])
            ),
            Some("kg_c")
        );
        assert_eq!(
            find_credential(&names, headers(&[("authorization", " ")])),
            None
        );
        assert_eq!(
            find_credential(&["x-key"], headers(&[("authorization", "kg_a")])),
            None
        );
    }

    fn fresh(mode: Mode) -> (NewToken, Uuid) {
        let id = Uuid::new_v4();
        (generate(&Brand::default(), mode, id).unwrap(), id)
    }

    #[test]
    fn generated_tokens_parse_back() {
        for mode in [Mode::Live, Mode::Test] {
            let (t, id) = fresh(mode);
            assert!(t.token.starts_with(&format!("kg_{}_", mode.as_str())));
            assert_eq!(t.token.len(), 79);
            assert!(
                t.token
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_')
            );
            let parsed = ParsedToken::parse(&t.token).unwrap();
            assert_eq!(parsed.key_id, id);
            assert_eq!(parsed.mode, mode);
            assert_eq!(parsed.prefix, t.prefix);
            assert!(parsed.digest().matches(&t.digest));
        }
    }

    #[test]
    fn bearer_scheme_is_accepted() {
        let (t, id) = fresh(Mode::Live);
        assert_eq!(
            ParsedToken::parse(&format!("Bearer {}", t.token))
                .unwrap()
                .key_id,
            id
        );
        assert_eq!(
            ParsedToken::parse(&format!("bearer {}", t.token))
                .unwrap()
                .key_id,
            id
        );
    }

    #[test]
    fn every_single_character_typo_is_caught_by_the_checksum() {
        let (t, _) = fresh(Mode::Test);
        let body_start = "kg_test_".len();
        for i in body_start..t.token.len() {
            let mut bytes = t.token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(
                ParsedToken::parse(&typo).unwrap_err(),
                TokenError::Malformed,
                "{i}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed_and_empty_is_missing() {
        for input in [
            "x",
            "kg_live_",
            "kg_prod_abc",
            "Bearer abc",
            "kg_live_ünïcödé",
            "_live_x",
            "KG_live_x",
        ] {
            assert_eq!(
                ParsedToken::parse(input).unwrap_err(),
                TokenError::Malformed,
                "{input}"
            );
        }
        for input in ["", "   ", "Bearer ", "Bearer   "] {
            assert_eq!(
                ParsedToken::parse(input).unwrap_err(),
                TokenError::Missing,
                "{input:?}"
            );
        }
        let long = "a".repeat(MAX_TOKEN_INPUT + 1);
        assert_eq!(
            ParsedToken::parse(&long).unwrap_err(),
            TokenError::Malformed
        );
    }

    #[test]
    fn secrets_differ_and_never_show_in_debug() {
        let (a, id) = fresh(Mode::Live);
        let b = generate(&Brand::default(), Mode::Live, id).unwrap();
        assert_ne!(a.token, b.token);
        assert!(!a.digest.matches(&b.digest));
        let secret = &a.token[a.prefix.len()..];
        assert!(!format!("{a:?}").contains(secret));
        let parsed = ParsedToken::parse(&a.token).unwrap();
        assert!(!format!("{parsed:?}").contains(secret));
        assert!(!masked(&a.prefix).contains(secret));
    }

    #[test]
    fn brands_are_validated() {
        assert!(Brand::new("ck").is_ok());
        assert!(Brand::new("op2").is_ok());
        for bad in ["", "Ck", "2x", "a_b", "abcdefghijklmnopq"] {
            assert!(Brand::new(bad).is_err(), "{bad}");
        }
        let t = generate(&Brand::new("ck").unwrap(), Mode::Live, Uuid::new_v4()).unwrap();
        assert!(t.token.starts_with("ck_live_"));
        assert!(ParsedToken::parse(&t.token).is_ok());
    }

    #[test]
    fn base62_round_trips_extremes() {
        for v in [0u128, 1, 61, 62, u128::MAX] {
            let mut s = String::new();
            push_base62(&mut s, v, ID_LEN);
            assert_eq!(decode_base62(s.as_bytes()), Some(v));
        }
        assert_eq!(decode_base62(&[b'z'; ID_LEN]), None, "overflow is rejected");
    }

    #[test]
    fn a_whole_prefix_names_its_key() {
        let id = Uuid::new_v4();
        let prefix = prefix_for(&Brand::default(), Mode::Live, id);
        assert_eq!(key_id_of_prefix(&prefix), Some(id));
        assert_eq!(key_id_of_prefix(&prefix[..prefix.len() - 1]), None);
        assert_eq!(key_id_of_prefix("kg_prod_x"), None);
    }
}
