//! The remote codec wire format: proto3 JSON of `temporal.api.common.v1.Payloads`, mapped
//! explicitly to and from the protobuf bytes the payload pipeline works on.
//!
//! `{"payloads":[{"metadata":{"encoding":"<base64>"},"data":"<base64>",
//! "externalPayloads":[{"sizeBytes":"123"}]}]}`. Reading follows the proto3 JSON rules: field
//! names in lowerCamelCase or as in the `.proto` (`external_payloads`, `size_bytes`), bytes in
//! standard or URL-safe base64 with or without padding, `null` for a default value, `int64`
//! as a string or a number; unknown fields are ignored. Writing uses lowerCamelCase, padded
//! standard base64 and `int64` as a string, and always writes `metadata` and `data` (some
//! clients read them without checking). Every metadata key round-trips exactly.

use std::cell::Cell;
use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

pub use crate::payload::{ExternalPayloadDetails, Payload};

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not proto3 JSON of `Payloads` (the message names what is wrong, never contents).
    Json(String),
    /// More than the allowed number of payloads (parsing stopped at the first one over).
    TooManyPayloads {
        /// The limit.
        max: usize,
    },
    /// More metadata entries and external payload details in total than allowed (parsing
    /// stopped at the first one over).
    TooManyFields {
        /// The limit.
        max: usize,
    },
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Json(why) => f.write_str(why),
            ParseError::TooManyPayloads { max } => write!(f, "more than {max} payloads"),
            ParseError::TooManyFields { max } => write!(
                f,
                "more than {max} metadata entries and external payload details in total"
            ),
        }
    }
}

/// Metadata entries plus external payload details allowed per request, per allowed payload
/// (Temporal's payloads carry a handful; this bounds what a body of tiny entries can cost).
pub const FIELDS_PER_PAYLOAD: usize = 64;

/// Parses a request body of at most `max_payloads` payloads (and [`FIELDS_PER_PAYLOAD`] ×
/// `max_payloads` metadata entries and external payload details in total). The limits are
/// counted while parsing: a body over them is refused at the first entry too many, before the
/// rest is read. Errors name what is wrong (never payload contents).
pub fn parse_payloads_limited(
    body: &[u8],
    max_payloads: usize,
) -> Result<Vec<Payload>, ParseError> {
    let limits = Limits {
        max_payloads,
        max_fields: max_payloads.saturating_mul(FIELDS_PER_PAYLOAD),
        fields: Cell::new(0),
        over: Cell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = RootSeed(&limits)
        .deserialize(&mut de)
        .and_then(|root| de.end().map(|()| root));
    match (parsed, limits.over.take()) {
        (_, Some(over)) => Err(over),
        (Ok(payloads), None) => Ok(payloads),
        (Err(e), None) => Err(ParseError::Json(format!(
            "request body is not proto3 JSON of temporal.api.common.v1.Payloads: {e}"
        ))),
    }
}

/// Parses a request body without a payload limit.
pub fn parse_payloads(body: &[u8]) -> Result<Vec<Payload>, String> {
    parse_payloads_limited(body, usize::MAX / FIELDS_PER_PAYLOAD).map_err(|e| e.to_string())
}

/// The limits of one parse and what has been counted.
struct Limits {
    max_payloads: usize,
    max_fields: usize,
    fields: Cell<usize>,
    /// Set when a limit stopped the parse (serde's error then only carries a message).
    over: Cell<Option<ParseError>>,
}

impl Limits {
    /// Counts one metadata entry or external payload detail.
    fn field<E: de::Error>(&self) -> Result<(), E> {
        let n = self.fields.get() + 1;
        if n > self.max_fields {
            self.over.set(Some(ParseError::TooManyFields {
                max: self.max_fields,
            }));
            return Err(E::custom("limit"));
        }
        self.fields.set(n);
        Ok(())
    }
}

/// The root object: `payloads` is read through [`PayloadsSeed`]; other fields are skipped.
struct RootSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = Vec<Payload>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = Vec<Payload>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with a `payloads` array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut payloads: Option<Vec<Payload>> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "payloads" {
                if payloads.is_some() {
                    return Err(de::Error::duplicate_field("payloads"));
                }
                payloads = Some(map.next_value_seed(PayloadsSeed(self.0))?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(payloads.unwrap_or_default())
    }
}

/// `null` or an array of payloads, counted as they are read.
struct PayloadsSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for PayloadsSeed<'_> {
    type Value = Vec<Payload>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PayloadsSeed<'_> {
    type Value = Vec<Payload>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of payloads")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let limits = self.0;
        let mut out = Vec::new();
        loop {
            if out.len() == limits.max_payloads {
                // One more element means too many: look without parsing it.
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    limits.over.set(Some(ParseError::TooManyPayloads {
                        max: limits.max_payloads,
                    }));
                    return Err(de::Error::custom("limit"));
                }
                return Ok(out);
            }
            match seq.next_element_seed(PayloadSeed(limits))? {
                Some(p) => out.push(p),
                None => return Ok(out),
            }
        }
    }
}

/// Writes a response body.
pub fn write_payloads(payloads: &[Payload]) -> Vec<u8> {
    struct Root<'a>(&'a [Payload]);
    impl Serialize for Root<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut st = s.serialize_struct("Payloads", 1)?;
            st.serialize_field(
                "payloads",
                &self.0.iter().map(JsonPayloadRef).collect::<Vec<_>>(),
            )?;
            st.end()
        }
    }
    // Sized up front: a large answer is written into one allocation instead of a doubling
    // series (which would briefly hold up to twice its size).
    let b64 = |n: usize| n.div_ceil(3) * 4;
    let estimate: usize = 16
        + payloads
            .iter()
            .map(|p| {
                48 + b64(p.data.len())
                    + p.metadata
                        .iter()
                        .map(|(k, v)| k.len() + 8 + b64(v.len()))
                        .sum::<usize>()
                    + p.external_payloads.len() * 40
            })
            .sum::<usize>();
    let mut out = Vec::with_capacity(estimate);
    serde_json::to_writer(&mut out, &Root(payloads)).expect("serializing to a Vec cannot fail");
    out
}

/// Standard base64 with padding, as proto3 JSON writes bytes.
const B64_OUT: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Accepts padded or unpadded input.
const B64_IN: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Decodes standard or URL-safe base64, padded or not.
fn decode_b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    if text.contains(['-', '_']) {
        let std: String = text
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        B64_IN.decode(std)
    } else {
        B64_IN.decode(text)
    }
}

struct B64(Vec<u8>);

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        decode_b64(&text)
            .map(B64)
            .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// `int64` in proto3 JSON: a string or a number.
struct Int64(i64);

impl<'de> Deserialize<'de> for Int64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Int64(n)),
            Raw::Text(t) => t
                .parse()
                .map(Int64)
                .map_err(|_| de::Error::custom(format!("invalid int64 {t:?}"))),
        }
    }
}

/// One payload (or `null`: the default payload), its metadata entries and external payload
/// details counted against the request's limit.
struct PayloadSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_> {
    type Value = Payload;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PayloadSeed<'_> {
    type Value = Payload;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a payload object")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Payload::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Payload::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let limits = self.0;
        let mut payload = Payload::default();
        let (mut seen_meta, mut seen_data, mut seen_ext) = (false, false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "metadata" => {
                    if std::mem::replace(&mut seen_meta, true) {
                        return Err(de::Error::duplicate_field("metadata"));
                    }
                    payload.metadata = map.next_value_seed(MetadataSeed(limits))?;
                }
                "data" => {
                    if std::mem::replace(&mut seen_data, true) {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    payload.data = map
                        .next_value::<Option<B64>>()?
                        .map(|b| Bytes::from(b.0))
                        .unwrap_or_default();
                }
                "externalPayloads" | "external_payloads" => {
                    if std::mem::replace(&mut seen_ext, true) {
                        return Err(de::Error::duplicate_field("externalPayloads"));
                    }
                    payload.external_payloads = map.next_value_seed(DetailsSeed(limits))?;
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(payload)
    }
}

/// `metadata`: `null` or a map of base64 values (`null` values: empty).
struct MetadataSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = BTreeMap<String, Vec<u8>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = BTreeMap<String, Vec<u8>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a metadata object")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            self.0.field()?;
            let value = map.next_value::<Option<B64>>()?;
            out.insert(key, value.map(|b| b.0).unwrap_or_default());
        }
        Ok(out)
    }
}

/// `externalPayloads`: `null` or an array of details (`null` entries: default).
struct DetailsSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for DetailsSeed<'_> {
    type Value = Vec<ExternalPayloadDetails>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DetailsSeed<'_> {
    type Value = Vec<ExternalPayloadDetails>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of external payload details")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        #[derive(Deserialize)]
        struct RawDetails {
            #[serde(default, alias = "size_bytes", rename = "sizeBytes")]
            size_bytes: Option<Int64>,
        }
        let mut out = Vec::new();
        while let Some(d) = seq.next_element::<Option<RawDetails>>()? {
            self.0.field()?;
            out.push(ExternalPayloadDetails {
                size_bytes: d.and_then(|d| d.size_bytes).map_or(0, |n| n.0),
            });
        }
        Ok(out)
    }
}

struct JsonPayloadRef<'a>(&'a Payload);

impl Serialize for JsonPayloadRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Meta<'a>(&'a BTreeMap<String, Vec<u8>>);
        impl Serialize for Meta<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0 {
                    m.serialize_entry(k, &B64_OUT.encode(v))?;
                }
                m.end()
            }
        }
        struct Details<'a>(&'a [ExternalPayloadDetails]);
        impl Serialize for Details<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|d| {
                    let mut m = BTreeMap::new();
                    if d.size_bytes != 0 {
                        m.insert("sizeBytes", d.size_bytes.to_string());
                    }
                    m
                }))
            }
        }
        let p = self.0;
        let fields = if p.external_payloads.is_empty() { 2 } else { 3 };
        let mut st = s.serialize_struct("Payload", fields)?;
        st.serialize_field("metadata", &Meta(&p.metadata))?;
        st.serialize_field("data", &B64_OUT.encode(&p.data))?;
        if !p.external_payloads.is_empty() {
            st.serialize_field("externalPayloads", &Details(&p.external_payloads))?;
        }
        st.end()
    }
}
