//! What keygate reads of an ext_authz CheckRequest, read in place from its
//! bytes.
//!
//! Envoy sends the whole request: every header, the peers, the route's
//! metadata. Decoded as prost messages that is a hash map and two strings a
//! header, a dozen more strings and their frees, about a fifth of a Check
//! under callgrind (BENCHMARKS.md, scenario 9), for five fields keygate
//! reads: the method, the path, the source address and the headers' names
//! and values. [`CheckView`] walks the protobuf once, down the path to those
//! fields only, and keeps where they lie in the request's bytes; everything
//! else is skipped unread. It reads what prost would: a field sent twice is
//! merged (the last string wins, a map's last entry for a name wins, repeated
//! headers add up), a oneof's last member wins, and the strings read must be
//! UTF-8. A property test holds it to prost on generated and mangled requests.

use std::ops::Range;

use prost::bytes::Bytes;

/// Where one string lies in the request's bytes.
type Span = Range<u32>;

/// One of the client's request headers.
struct Header {
    key: Span,
    value: Span,
    /// `HeaderValue.raw_value` (from `header_map`); empty for map entries.
    raw_value: Span,
    /// From the `headers` map rather than `header_map`.
    from_map: bool,
}

/// The fields of a CheckRequest that keygate reads. Its `Debug` shows no
/// header value: the request carries the caller's credential.
pub struct CheckView {
    bytes: Bytes,
    /// `attributes.request.http` was present.
    has_http: bool,
    method: Span,
    path: Span,
    /// `attributes.source.address.socket_address.address`, when the
    /// address is a socket address.
    source: Option<Span>,
    /// No bound of its own: the Check request size bound
    /// (`--ext-authz-max-request-size`) caps how many there can be, and a
    /// header costs less here than the two strings prost would make of it.
    headers: Vec<Header>,
}

impl std::fmt::Debug for CheckView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckView")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("source", &self.source_ip())
            .field("headers", &self.headers.len())
            .finish_non_exhaustive()
    }
}

/// Why a request could not be read, naming the message or field at fault
/// (in prost's words, which tonic's generated servers answer with).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct DecodeError {
    at: &'static str,
    reason: &'static str,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Deepest nesting of skipped groups (prost's recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

impl CheckView {
    /// Reads `bytes`, an encoded CheckRequest.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let len = u32::try_from(bytes.len()).map_err(|_| DecodeError {
            at: "CheckRequest",
            reason: "message too long",
        })?;
        let mut view = Self {
            bytes,
            has_http: false,
            method: 0..0,
            path: 0..0,
            source: None,
            // Room for a typical request's headers: one allocation, not
            // one each time it doubles.
            headers: Vec::with_capacity(16),
        };
        let bytes = view.bytes.clone();
        let mut r = Reader {
            buf: &bytes,
            name: "CheckRequest",
            pos: 0,
            end: len,
        };
        // CheckRequest { 1: attributes }
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => {
                    let mut m = r.message(wire, "CheckRequest.attributes", "AttributeContext")?;
                    view.attributes(&mut m)?;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(view)
    }

    /// AttributeContext { 1: source, 4: request }
    fn attributes(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => {
                    // Peer { 1: address }
                    let mut peer = r.message(wire, "AttributeContext.source", "Peer")?;
                    while let Some((field, wire)) = peer.key()? {
                        match field {
                            1 => {
                                let mut address = peer.message(wire, "Peer.address", "Address")?;
                                self.address(&mut address)?;
                            }
                            _ => peer.skip(field, wire)?,
                        }
                    }
                }
                4 => {
                    // Request { 2: http }
                    let mut request = r.message(wire, "AttributeContext.request", "Request")?;
                    while let Some((field, wire)) = request.key()? {
                        match field {
                            2 => {
                                let mut http =
                                    request.message(wire, "Request.http", "HttpRequest")?;
                                self.http(&mut http)?;
                            }
                            _ => request.skip(field, wire)?,
                        }
                    }
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(())
    }

    /// Address { oneof: 1 socket_address, 2 pipe, 3 envoy_internal_address }
    fn address(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => {
                    // A second socket_address merges into the first; after
                    // another member it starts afresh.
                    let mut address = self.source.take().unwrap_or(0..0);
                    // SocketAddress { 2: address }
                    let mut socket = r.message(wire, "Address.socket_address", "SocketAddress")?;
                    while let Some((field, wire)) = socket.key()? {
                        match field {
                            2 => address = socket.string(wire, "SocketAddress.address")?,
                            _ => socket.skip(field, wire)?,
                        }
                    }
                    self.source = Some(address);
                }
                2 | 3 => {
                    r.message(wire, "Address.address", "Address")?;
                    self.source = None;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(())
    }

    /// HttpRequest { 2: method, 3: headers (map), 4: path, 13: header_map }
    fn http(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        self.has_http = true;
        while let Some((field, wire)) = r.key()? {
            match field {
                2 => self.method = r.string(wire, "HttpRequest.method")?,
                4 => self.path = r.string(wire, "HttpRequest.path")?,
                3 => {
                    let mut entry = r.message(wire, "HttpRequest.headers", "HeadersEntry")?;
                    self.headers.push(header(&mut entry, true)?);
                }
                13 => {
                    // HeaderMap { 1: repeated HeaderValue }
                    let mut map = r.message(wire, "HttpRequest.header_map", "HeaderMap")?;
                    while let Some((field, wire)) = map.key()? {
                        match field {
                            1 => {
                                let mut h =
                                    map.message(wire, "HeaderMap.headers", "HeaderValue")?;
                                self.headers.push(header(&mut h, false)?);
                            }
                            _ => map.skip(field, wire)?,
                        }
                    }
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(())
    }

    fn span(&self, span: &Span) -> &[u8] {
        &self.bytes[span.start as usize..span.end as usize]
    }

    fn str(&self, span: &Span) -> &str {
        // Checked as UTF-8 when read (`Reader::string`); a span never
        // reads as anything else.
        std::str::from_utf8(self.span(span)).unwrap_or("")
    }

    /// Whether Envoy sent `attributes.request.http` at all.
    pub fn has_http(&self) -> bool {
        self.has_http
    }

    /// The request's method.
    pub fn method(&self) -> &str {
        self.str(&self.method)
    }

    /// The request's path, query included.
    pub fn path(&self) -> &str {
        self.str(&self.path)
    }

    /// The downstream address Envoy reports as the request's source, when
    /// it is a socket address.
    pub fn source_ip(&self) -> Option<&str> {
        self.source.as_ref().map(|s| self.str(s))
    }

    /// The value of header `name` (lower case, as Envoy sends names): from
    /// the `headers` map when there (its last entry for the name), else the
    /// first of `header_map`'s, whose `raw_value` is read as UTF-8 when
    /// `value` is empty (not UTF-8: empty, so no credential).
    pub fn header(&self, name: &str) -> Option<&str> {
        let named = |h: &&Header| self.span(&h.key) == name.as_bytes();
        if let Some(h) = self.headers.iter().filter(|h| h.from_map).rfind(named) {
            return Some(self.str(&h.value));
        }
        let h = self.headers.iter().filter(|h| !h.from_map).find(named)?;
        if h.value.is_empty() {
            Some(std::str::from_utf8(self.span(&h.raw_value)).unwrap_or(""))
        } else {
            Some(self.str(&h.value))
        }
    }

    /// Every header's name, as often as the request has it, as the bytes
    /// it was sent as (UTF-8, checked when read).
    pub fn header_names(&self) -> impl Iterator<Item = &[u8]> {
        self.headers.iter().map(|h| self.span(&h.key))
    }
}

/// A `headers` map entry { 1: key, 2: value } (`from_map`), or a
/// `header_map` HeaderValue { 1: key, 2: value, 3: raw_value }.
fn header(r: &mut Reader<'_>, from_map: bool) -> Result<Header, DecodeError> {
    let [key, value] = if from_map {
        ["HeadersEntry.key", "HeadersEntry.value"]
    } else {
        ["HeaderValue.key", "HeaderValue.value"]
    };
    let mut header = Header {
        key: 0..0,
        value: 0..0,
        raw_value: 0..0,
        from_map,
    };
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => header.key = r.string(wire, key)?,
            2 => header.value = r.string(wire, value)?,
            3 if !from_map => header.raw_value = r.bytes(wire, "HeaderValue.raw_value")?,
            _ => r.skip(field, wire)?,
        }
    }
    Ok(header)
}

/// A cursor over one message's bytes.
struct Reader<'a> {
    buf: &'a Bytes,
    /// The message's type, for errors.
    name: &'static str,
    pos: u32,
    end: u32,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: &'static str) -> DecodeError {
        DecodeError {
            at: self.name,
            reason,
        }
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= self.end {
            return Err(self.error("buffer underflow"));
        }
        let b = self.buf[self.pos as usize];
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        // Keys and most lengths fit one byte.
        let first = self.byte()?;
        if first < 0x80 {
            return Ok(u64::from(first));
        }
        self.pos -= 1;
        self.long_varint()
    }

    #[cold]
    fn long_varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            // The tenth byte holds the top bit only.
            if shift == 63 && b > 1 {
                return Err(self.error("invalid varint"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(value);
            }
        }
        Err(self.error("invalid varint"))
    }

    /// The next field's number and wire type; `None` at the message's end.
    #[inline]
    fn key(&mut self) -> Result<Option<(u32, u8)>, DecodeError> {
        if self.pos == self.end {
            return Ok(None);
        }
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| self.error("invalid key value"))?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        if field == 0 {
            return Err(self.error("invalid tag value: 0"));
        }
        Ok(Some((field, wire)))
    }

    /// The span of length-delimited field `field`'s body (`field` names it
    /// in errors).
    #[inline]
    fn delimited(&mut self, wire: u8, field: &'static str) -> Result<Span, DecodeError> {
        let error = |reason| DecodeError { at: field, reason };
        if wire != LENGTH_DELIMITED {
            return Err(error("invalid wire type (expected length-delimited)"));
        }
        let len = self.varint()?;
        let start = self.pos;
        let end = u64::from(start) + len;
        if end > u64::from(self.end) {
            return Err(error("buffer underflow"));
        }
        self.pos = end as u32;
        Ok(start..self.pos)
    }

    /// Embedded message `field`, of type `name`.
    fn message(
        &mut self,
        wire: u8,
        field: &'static str,
        name: &'static str,
    ) -> Result<Reader<'a>, DecodeError> {
        let span = self.delimited(wire, field)?;
        Ok(Reader {
            buf: self.buf,
            name,
            pos: span.start,
            end: span.end,
        })
    }

    fn string(&mut self, wire: u8, field: &'static str) -> Result<Span, DecodeError> {
        let span = self.delimited(wire, field)?;
        std::str::from_utf8(&self.buf[span.start as usize..span.end as usize]).map_err(|_| {
            DecodeError {
                at: field,
                reason: "invalid string value: data is not UTF-8 encoded",
            }
        })?;
        Ok(span)
    }

    fn bytes(&mut self, wire: u8, field: &'static str) -> Result<Span, DecodeError> {
        self.delimited(wire, field)
    }

    /// Skips field `field` of wire type `wire`, which keygate does not read.
    fn skip(&mut self, field: u32, wire: u8) -> Result<(), DecodeError> {
        self.skip_nested(field, wire, 0)
    }

    fn skip_nested(&mut self, field: u32, wire: u8, depth: u32) -> Result<(), DecodeError> {
        let len = match wire {
            VARINT => return self.varint().map(drop),
            FIXED64 => 8,
            FIXED32 => 4,
            LENGTH_DELIMITED => return self.delimited(wire, self.name).map(drop),
            // A group (deprecated; never sent by Envoy, but prost skips
            // them): fields up to its end, nested no deeper than prost goes.
            START_GROUP => {
                if depth == MAX_GROUP_DEPTH {
                    return Err(self.error("recursion limit reached"));
                }
                loop {
                    match self.key()? {
                        None => return Err(self.error("buffer underflow")),
                        Some((inner, END_GROUP)) if inner == field => return Ok(()),
                        Some((_, END_GROUP)) => {
                            return Err(self.error("unexpected end group tag"));
                        }
                        Some((inner, wire)) => self.skip_nested(inner, wire, depth + 1)?,
                    }
                }
            }
            _ => return Err(self.error("invalid wire type")),
        };
        if self.end - self.pos < len {
            return Err(self.error("buffer underflow"));
        }
        self.pos += len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use prost::Message;

    /// What keygate reads, through prost.
    #[derive(Debug, PartialEq)]
    struct Read {
        has_http: bool,
        method: String,
        path: String,
        source: Option<String>,
        headers: Vec<(String, Option<String>)>,
    }

    fn through_prost(bytes: &[u8], names: &[String]) -> Option<Read> {
        use envoy_types::pb::envoy::config::core::v3::address::Address;
        let check = CheckRequest::decode(bytes).ok()?;
        let attributes = check.attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http);
        let source = attributes
            .source
            .and_then(|p| p.address)
            .and_then(|a| a.address)
            .and_then(|a| match a {
                Address::SocketAddress(s) => Some(s.address),
                _ => None,
            });
        let has_http = http.is_some();
        let http = http.unwrap_or_default();
        let raw = http.header_map.clone().unwrap_or_default().headers;
        let headers = names
            .iter()
            .map(|name| {
                let value = match http.headers.get(name) {
                    Some(v) => Some(v.clone()),
                    None => raw.iter().find(|h| &h.key == name).map(|h| {
                        if h.value.is_empty() {
                            String::from_utf8(h.raw_value.clone()).unwrap_or_default()
                        } else {
                            h.value.clone()
                        }
                    }),
                };
                (name.clone(), value)
            })
            .collect();
        Some(Read {
            has_http,
            method: http.method,
            path: http.path,
            source,
            headers,
        })
    }

    fn through_view(bytes: &[u8], names: &[String]) -> Option<Read> {
        let view = CheckView::decode(Bytes::copy_from_slice(bytes)).ok()?;
        Some(Read {
            has_http: view.has_http(),
            method: view.method().into(),
            path: view.path().into(),
            source: view.source_ip().map(String::from),
            headers: names
                .iter()
                .map(|n| (n.clone(), view.header(n).map(String::from)))
                .collect(),
        })
    }

    /// Names worth asking for in `bytes`: those prost finds, and a few it
    /// should not.
    fn names(bytes: &[u8]) -> Vec<String> {
        let mut names: Vec<String> = ["x-api-key", "authorization", "absent"]
            .map(String::from)
            .into();
        if let Ok(check) = CheckRequest::decode(bytes) {
            let http = check
                .attributes
                .and_then(|a| a.request)
                .and_then(|r| r.http)
                .unwrap_or_default();
            names.extend(http.headers.into_keys());
            names.extend(
                http.header_map
                    .unwrap_or_default()
                    .headers
                    .into_iter()
                    .map(|h| h.key),
            );
        }
        names
    }

    fn sample(token: &str) -> CheckRequest {
        use envoy_types::pb::envoy::config::core::v3::{
            Address, HeaderMap, HeaderValue, SocketAddress, address,
        };
        use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
            HttpRequest, Peer, Request,
        };
        let socket = |ip: &str| Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    ..Default::default()
                })),
            }),
            principal: "spiffe://x".into(),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(socket("203.0.113.7")),
                destination: Some(socket("10.0.0.1")),
                request: Some(Request {
                    http: Some(HttpRequest {
                        id: "42".into(),
                        method: "POST".into(),
                        path: "/v1/checkouts?expand=items".into(),
                        host: "api.example.com".into(),
                        headers: [("x-forwarded-proto".to_string(), "https".to_string())].into(),
                        header_map: Some(HeaderMap {
                            headers: vec![
                                HeaderValue {
                                    key: "x-api-key".into(),
                                    raw_value: token.as_bytes().to_vec(),
                                    ..Default::default()
                                },
                                HeaderValue {
                                    key: "x-keygate-key-id".into(),
                                    value: "forged".into(),
                                    ..Default::default()
                                },
                            ],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: [("tenant".to_string(), "a".to_string())].into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_what_envoy_sends() {
        let bytes = sample("kg_live_abc").encode_to_vec();
        let view = CheckView::decode(Bytes::from(bytes)).unwrap();
        assert!(view.has_http());
        assert_eq!(view.method(), "POST");
        assert_eq!(view.path(), "/v1/checkouts?expand=items");
        assert_eq!(view.source_ip(), Some("203.0.113.7"));
        assert_eq!(view.header("x-api-key"), Some("kg_live_abc"));
        assert_eq!(view.header("x-forwarded-proto"), Some("https"));
        assert_eq!(view.header("x-keygate-key-id"), Some("forged"));
        assert_eq!(view.header("authorization"), None);
        let mut names: Vec<&[u8]> = view.header_names().collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [&b"x-api-key"[..], b"x-forwarded-proto", b"x-keygate-key-id"]
        );
    }

    #[test]
    fn debug_shows_no_header_value() {
        let bytes = sample("kg_live_secretvalue").encode_to_vec();
        let view = CheckView::decode(Bytes::from(bytes)).unwrap();
        let shown = format!("{view:?}");
        assert!(shown.contains("/v1/checkouts"), "{shown}");
        assert!(!shown.contains("secretvalue"), "{shown}");
    }

    #[test]
    fn an_empty_request_has_no_http() {
        let view = CheckView::decode(Bytes::new()).unwrap();
        assert!(!view.has_http());
        assert_eq!(view.source_ip(), None);
    }

    #[test]
    fn reads_as_prost_does_when_fields_repeat() {
        // Two encoded messages one after the other are one merged message.
        let a = sample("kg_live_first").encode_to_vec();
        let mut b = sample("kg_live_second");
        let http = b
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.method = "GET".into();
        http.headers
            .insert("x-forwarded-proto".into(), "http".into());
        let bytes = [a, b.encode_to_vec()].concat();
        let names = names(&bytes);
        let prost = through_prost(&bytes, &names).unwrap();
        assert_eq!(prost.method, "GET");
        assert_eq!(through_view(&bytes, &names), Some(prost));
    }

    #[test]
    fn bad_bytes_are_refused_without_panicking() {
        let good = sample("kg_live_abc").encode_to_vec();
        for cut in 0..good.len() {
            // Every prefix either reads as prost reads it or is refused.
            let bytes = &good[..cut];
            let names = names(bytes);
            if let Some(view) = through_view(bytes, &names) {
                assert_eq!(Some(view), through_prost(bytes, &names), "cut at {cut}");
            }
        }
        for bad in [
            &[0x0a, 0xff][..], // a length past the end
            &[
                0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02,
            ], // varint overflow
            &[0x00],           // field 0
            &[0x0b],           // a group with no end
            &[0x0b, 0x14],     // a group ended by field 2's end
            &[0x08, 0x01],     // attributes as a varint
        ] {
            assert!(
                CheckView::decode(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut check = sample("kg_live_abc");
        let http = check
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.headers.insert("x-junk".into(), "PLACEHOLDER".into());
        let bytes = check.encode_to_vec();
        let at = bytes.windows(11).position(|w| w == b"PLACEHOLDER").unwrap();
        let mut bad = bytes.clone();
        bad[at] = 0xff;
        let e = CheckView::decode(Bytes::from(bad)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "HeadersEntry.value: invalid string value: data is not UTF-8 encoded"
        );
        let e = CheckView::decode(Bytes::copy_from_slice(&bytes[..bytes.len() - 1])).unwrap_err();
        assert_eq!(e.to_string(), "CheckRequest.attributes: buffer underflow");
    }

    /// A request of generated parts: header names from a small set so that
    /// they repeat, within the map, within `header_map` and across both.
    fn generated() -> impl proptest::strategy::Strategy<Value = CheckRequest> {
        use envoy_types::pb::envoy::config::core::v3::{
            Address, HeaderMap, HeaderValue, Pipe, SocketAddress, address,
        };
        use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
            HttpRequest, Peer, Request,
        };
        use proptest::prelude::*;
        let name = prop_oneof![
            Just("x-api-key".to_string()),
            Just("authorization".to_string()),
            "x-[a-c]{1,2}",
        ];
        let value = "[ -~]{0,8}";
        let raw = proptest::collection::vec(any::<u8>(), 0..8);
        let address = prop_oneof![
            Just(None),
            "[0-9.]{0,15}".prop_map(|ip| Some(address::Address::SocketAddress(SocketAddress {
                address: ip,
                port_specifier: None,
                ..Default::default()
            }))),
            "[a-z/]{0,8}".prop_map(|path| Some(address::Address::Pipe(Pipe { path, mode: 0 }))),
        ];
        (
            proptest::option::of(address),
            proptest::option::of((
                "[A-Z]{0,6}",
                "[ -~]{0,12}",
                proptest::collection::hash_map(name.clone(), value, 0..4),
                proptest::option::of(proptest::collection::vec((name, value, raw), 0..4)),
            )),
        )
            .prop_map(|(address, http)| CheckRequest {
                attributes: Some(AttributeContext {
                    source: address.map(|address| Peer {
                        address: Some(Address { address }),
                        ..Default::default()
                    }),
                    request: Some(Request {
                        http: http.map(|(method, path, headers, header_map)| HttpRequest {
                            method,
                            path,
                            headers,
                            header_map: header_map.map(|headers| HeaderMap {
                                headers: headers
                                    .into_iter()
                                    .map(|(key, value, raw_value)| HeaderValue {
                                        key,
                                        value,
                                        raw_value,
                                    })
                                    .collect(),
                            }),
                            host: "api.example.com".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
    }

    /// Generated requests, merged (one to three sent one after the other)
    /// and mangled: wherever prost reads one, the view reads the same.
    #[test]
    fn reads_as_prost_does_on_generated_requests() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        // A fixed seed: the same cases every run, so the counts below hold.
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: 4_000,
                ..Config::default()
            },
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        let strategy = (
            proptest::collection::vec(generated(), 1..4),
            prop_oneof![3 => Just(None), 1 => any::<u16>().prop_map(Some)],
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..2),
        );
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let (read, merged) = (AtomicUsize::new(0), AtomicUsize::new(0));
        runner
            .run(&strategy, |(requests, cut, flips)| {
                let mut bytes: Vec<u8> = requests.iter().flat_map(Message::encode_to_vec).collect();
                for (at, value) in flips {
                    if !bytes.is_empty() {
                        let at = at % bytes.len();
                        bytes[at] = value;
                    }
                }
                if let Some(cut) = cut {
                    bytes.truncate(usize::from(cut) % (bytes.len() + 1));
                }
                let names = names(&bytes);
                let prost = through_prost(&bytes, &names);
                let view = through_view(&bytes, &names);
                // The view may read what prost refuses, for a fault in a
                // field keygate does not read; never the other way.
                if let Some(prost) = prost {
                    read.fetch_add(1, Relaxed);
                    merged.fetch_add(usize::from(requests.len() > 1), Relaxed);
                    prop_assert_eq!(view, Some(prost));
                }
                Ok(())
            })
            .unwrap();
        // Enough of them read at all, merged ones among them, for the
        // comparison to say something.
        let (read, merged) = (read.into_inner(), merged.into_inner());
        assert!(read > 1_500 && merged > 600, "{read} read, {merged} merged");
    }
}
