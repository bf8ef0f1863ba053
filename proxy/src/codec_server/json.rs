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

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

pub use crate::payload::{ExternalPayloadDetails, Payload};

/// Parses a request body. Errors name what is wrong (never payload contents).
pub fn parse_payloads(body: &[u8]) -> Result<Vec<Payload>, String> {
    #[derive(Deserialize)]
    struct Root {
        #[serde(default)]
        payloads: Option<Vec<Option<JsonPayload>>>,
    }
    let root: Root = serde_json::from_slice(body).map_err(|e| {
        format!("request body is not proto3 JSON of temporal.api.common.v1.Payloads: {e}")
    })?;
    Ok(root
        .payloads
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.map(|p| p.0).unwrap_or_default())
        .collect())
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
    serde_json::to_vec(&Root(payloads)).expect("serializing to a Vec cannot fail")
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

struct JsonPayload(Payload);

impl<'de> Deserialize<'de> for JsonPayload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: Option<BTreeMap<String, Option<B64>>>,
            #[serde(default)]
            data: Option<B64>,
            #[serde(default, alias = "external_payloads", rename = "externalPayloads")]
            external_payloads: Option<Vec<Option<RawDetails>>>,
        }
        #[derive(Deserialize)]
        struct RawDetails {
            #[serde(default, alias = "size_bytes", rename = "sizeBytes")]
            size_bytes: Option<Int64>,
        }
        let raw = Raw::deserialize(d)?;
        Ok(JsonPayload(Payload {
            metadata: raw
                .metadata
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.map(|b| b.0).unwrap_or_default()))
                .collect(),
            data: raw.data.map(|b| Bytes::from(b.0)).unwrap_or_default(),
            external_payloads: raw
                .external_payloads
                .unwrap_or_default()
                .into_iter()
                .map(|d| ExternalPayloadDetails {
                    size_bytes: d.and_then(|d| d.size_bytes).map_or(0, |n| n.0),
                })
                .collect(),
        }))
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
