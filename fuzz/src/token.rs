//! The token parser (`keygate_core::token`).
//!
//! - Whatever the input, parsing returns; `Missing` means blank.
//! - An accepted token re-encodes to itself: its brand, mode, key id and
//!   secret, written out again by this module's own encoder, give back the
//!   exact presented text, and its prefix and digest are those of its parts.
//! - Tokens made from any parts parse back to those parts, bare, after
//!   `Bearer ` and inside whitespace.
//! - A one-character change to a valid token never parses as that token:
//!   a substitution is always refused (CRC-32 catches every burst of up to
//!   32 bits), and an insertion or deletion is refused or yields another
//!   prefix, which no key of the original's prefix accepts. Only whitespace
//!   added at either end, which is not part of a token, leaves it unchanged.

use arbitrary::Arbitrary;
use keygate_core::key::Mode;
use keygate_core::token::{self, Brand, MAX_TOKEN_INPUT, ParsedToken, SecretDigest, TokenError};
use uuid::Uuid;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_LEN: usize = 22;
const SECRET_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;

/// The parts of a well-formed token.
#[derive(Debug, Clone, Arbitrary)]
pub struct Parts {
    /// How many characters of `brand` to take, modulo 17; 0 is `kg`.
    brand_len: u8,
    /// Mapped onto the brand alphabet: a letter first.
    brand: [u8; 16],
    live: bool,
    key_id: u128,
    /// Mapped onto base62.
    secret: [u8; SECRET_LEN],
}

impl Parts {
    pub fn brand(&self) -> Brand {
        let text: String = self
            .brand
            .iter()
            .take(usize::from(self.brand_len % 17))
            .enumerate()
            .map(|(i, &b)| {
                if i == 0 {
                    char::from(b'a' + b % 26)
                } else {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(b % 36)])
                }
            })
            .collect();
        Brand::new(&text).unwrap_or_default()
    }

    pub fn mode(&self) -> Mode {
        if self.live { Mode::Live } else { Mode::Test }
    }

    pub fn key_id(&self) -> Uuid {
        Uuid::from_u128(self.key_id)
    }

    pub fn secret(&self) -> String {
        secret_from(&self.secret)
    }

    /// These parts with another secret.
    pub fn with_secret(&self, secret: [u8; SECRET_LEN]) -> Parts {
        Parts {
            secret,
            ..self.clone()
        }
    }

    pub fn token(&self) -> String {
        encode(
            self.brand().as_str(),
            self.mode(),
            self.key_id(),
            &self.secret(),
        )
    }
}

/// 43 base62 characters from any 43 bytes.
pub fn secret_from(bytes: &[u8; SECRET_LEN]) -> String {
    bytes
        .iter()
        .map(|&b| char::from(ALPHABET[usize::from(b % 62)]))
        .collect()
}

/// The token format written out from its definition (the module doc of
/// `keygate_core::token`), not by its encoder:
/// `<brand>_<mode>_<id: 22 base62><secret: 43 base62><CRC32 of all before: 6 base62>`.
pub fn encode(brand: &str, mode: Mode, key_id: Uuid, secret: &str) -> String {
    let mode = match mode {
        Mode::Live => "live",
        Mode::Test => "test",
    };
    let mut token = format!(
        "{brand}_{mode}_{}{secret}",
        base62(key_id.as_u128(), ID_LEN)
    );
    let crc = crc32fast::hash(token.as_bytes());
    token.push_str(&base62(u128::from(crc), CHECKSUM_LEN));
    token
}

/// `value` as exactly `width` base62 digits, most significant first.
fn base62(mut value: u128, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for digit in digits.iter_mut().rev() {
        *digit = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    assert_eq!(value, 0, "{width} base62 digits hold the value");
    digits.into_iter().map(char::from).collect()
}

/// One character of a token replaced, removed or added.
#[derive(Debug, Clone, Arbitrary)]
pub enum Edit {
    Replace { at: usize, with: EditChar },
    Delete { at: usize },
    Insert { at: usize, with: EditChar },
}

/// A character for an edit: mostly one a token is made of (base62 or
/// `_`), where a checksum has to catch it; for 3 modulo 4, `any`.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct EditChar {
    pick: u8,
    any: char,
}

impl EditChar {
    pub fn char(self) -> char {
        match self.pick % 4 {
            3 => self.any,
            _ if self.pick % 63 == 62 => '_',
            _ => char::from(ALPHABET[usize::from(self.pick % 63) % 62]),
        }
    }
}

impl Edit {
    /// `text` edited at a character position taken modulo its length, or
    /// `None` when the edit leaves it as it was.
    pub fn apply(&self, text: &str) -> Option<String> {
        let mut chars: Vec<char> = text.chars().collect();
        if chars.is_empty() {
            return None;
        }
        match *self {
            Edit::Replace { at, with } => {
                let at = at % chars.len();
                if chars[at] == with.char() {
                    return None;
                }
                chars[at] = with.char();
            }
            Edit::Delete { at } => {
                chars.remove(at % chars.len());
            }
            Edit::Insert { at, with } => chars.insert(at % (chars.len() + 1), with.char()),
        }
        Some(chars.into_iter().collect())
    }
}

/// How a token is presented around its text.
#[derive(Debug, Clone, Arbitrary)]
pub struct Presentation {
    bearer: Option<bool>,
    leading: u8,
    trailing: u8,
}

impl Presentation {
    pub fn present(&self, token: &str) -> String {
        let scheme = match self.bearer {
            Some(true) => "Bearer ",
            Some(false) => "bEaReR ",
            None => "",
        };
        let blank = |n: u8| {
            " \t\n"
                .chars()
                .cycle()
                .take(usize::from(n % 4))
                .collect::<String>()
        };
        // Blanks go after the scheme: the parser strips `Bearer ` from the
        // very start only, as an Authorization header's value begins.
        format!(
            "{scheme}{}{token}{}",
            blank(self.leading),
            blank(self.trailing)
        )
    }
}

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub parts: Parts,
    pub presentation: Presentation,
    pub edit: Edit,
}

/// The target: `text` is parsed as presented.
pub fn run(data: &[u8]) {
    super::run(data, check);
}

pub fn check(input: &Input, text: &str) {
    check_parse(text);
    let token = input.parts.token();
    check_parts_parse_back(&input.parts, &token);
    let presented = input.presentation.present(&token);
    check_parse(&presented);
    assert_same(&presented, &token);
    check_edit(&token, &input.edit);
}

/// Parsing `raw` returns; what it accepts re-encodes to itself.
pub fn check_parse(raw: &str) {
    let blank = token::strip_bearer(raw).trim().is_empty();
    match ParsedToken::parse(raw) {
        Err(TokenError::Missing) => assert!(blank && raw.len() <= MAX_TOKEN_INPUT),
        Err(TokenError::Malformed) => assert!(!blank || raw.len() > MAX_TOKEN_INPUT),
        Ok(parsed) => {
            assert!(raw.len() <= MAX_TOKEN_INPUT);
            let presented = token::strip_bearer(raw).trim();
            let (brand, _) = presented
                .split_once('_')
                .expect("an accepted token has a brand");
            let brand = Brand::new(brand).expect("an accepted token's brand is valid");
            let secret_at = parsed.prefix.len();
            let secret = presented
                .get(secret_at..secret_at + SECRET_LEN)
                .expect("an accepted token holds a whole secret after its prefix");
            assert_eq!(
                encode(brand.as_str(), parsed.mode, parsed.key_id, secret),
                presented,
                "an accepted token re-encodes to itself"
            );
            assert_eq!(
                parsed.prefix,
                token::prefix_for(&brand, parsed.mode, parsed.key_id)
            );
            assert!(parsed.digest().matches(&SecretDigest::of(secret)));
            let kept = parsed.credential();
            assert_eq!(
                (kept.key_id, kept.prefix.as_str()),
                (parsed.key_id, parsed.prefix)
            );
            assert!(kept.digest.matches(&parsed.digest()));
        }
    }
}

/// A token made from `parts` parses back to them.
pub fn check_parts_parse_back(parts: &Parts, token: &str) {
    let parsed = ParsedToken::parse(token).expect("a token made from valid parts parses");
    assert_eq!(parsed.key_id, parts.key_id());
    assert_eq!(parsed.mode, parts.mode());
    assert_eq!(
        parsed.prefix,
        token::prefix_for(&parts.brand(), parts.mode(), parts.key_id())
    );
    assert!(parsed.digest().matches(&SecretDigest::of(&parts.secret())));
    assert!(token.len() <= 93, "at most 93 characters");
    check_parse(token);
}

/// `presented` parses as exactly `token`.
fn assert_same(presented: &str, token: &str) {
    let (a, b) = (
        ParsedToken::parse(presented).expect("a presented valid token parses"),
        ParsedToken::parse(token).expect("a valid token parses"),
    );
    assert_eq!((a.key_id, a.mode, a.prefix), (b.key_id, b.mode, b.prefix));
    assert!(a.digest().matches(&b.digest()));
}

/// One character changed in a valid `token` never parses as that token.
pub fn check_edit(token: &str, edit: &Edit) {
    let Some(edited) = edit.apply(token) else {
        return;
    };
    if edited.trim() == token {
        // Whitespace added at an end: not part of the token.
        assert_same(&edited, token);
        return;
    }
    let original = ParsedToken::parse(token).expect("a valid token parses");
    match ParsedToken::parse(&edited) {
        Err(_) => {}
        Ok(parsed) => {
            assert!(
                !matches!(edit, Edit::Replace { with, .. } if !with.char().is_whitespace()),
                "a substituted character always breaks the checksum"
            );
            assert_ne!(
                parsed.prefix, original.prefix,
                "an edited token that parses is another key's"
            );
        }
    }
}
