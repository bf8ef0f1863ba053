//! Temporal's external storage reference payload, written and read byte-compatibly with the
//! SDKs (`temporalio.converter.ExternalStorage`).
//!
//! Written: `metadata {encoding: json/protobuf, messageType:
//! temporal.api.sdk.v1.ExternalStorageReference}`, `data` = proto3 JSON
//! `{"claimData":{...},"driverName":"..."}`, `external_payloads` = one
//! `ExternalPayloadDetails { size_bytes }` with the stored size.
//!
//! Read: that form, the legacy `json/external-storage-reference` form
//! (`{"driver_name": ..., "driver_claim": {"claim_data": {...}}}`), and a codec-encoded reference
//! carrying `__temporal_external_storage_reference = true`.

use std::collections::BTreeMap;

use bytes::Bytes;
use payload_gateway_drivers::ClaimData;
use prost::Message;
use serde::Deserialize;

/// `encoding` of the current reference form.
pub const ENCODING_JSON_PROTOBUF: &[u8] = b"json/protobuf";
/// `messageType` of the current reference form.
pub const REFERENCE_MESSAGE_TYPE: &[u8] = b"temporal.api.sdk.v1.ExternalStorageReference";
/// `encoding` of the legacy reference form.
pub const ENCODING_LEGACY: &[u8] = b"json/external-storage-reference";
/// Metadata key marking a (codec-encoded) reference.
pub const MARKER_KEY: &str = "__temporal_external_storage_reference";

use crate::payload::{ExternalPayloadDetails, Payload as RefPayload};

/// Only the metadata of a payload: decoding skips `data` without copying it.
#[derive(Clone, PartialEq, prost::Message)]
struct MetaOnly {
    #[prost(btree_map = "string, bytes", tag = "1")]
    metadata: BTreeMap<String, Vec<u8>>,
}

/// A decoded reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The driver that stored the payload.
    pub driver_name: String,
    /// Its claim.
    pub claim: ClaimData,
    /// The stored size the reference declares (`external_payloads[0].size_bytes`), if any.
    /// Untrusted: used to refuse a fan-out before fetching, then checked against the object.
    pub declared_size: Option<u64>,
}

/// What a payload is, as far as storage is concerned.
#[derive(Debug)]
pub enum Kind {
    /// An ordinary payload.
    Plain,
    /// A reference.
    Reference(Reference),
    /// A codec-encoded reference (marker set): decode it with the codec, then parse again.
    Marked(Bytes),
}

/// Builds the reference payload for `claim` stored by `driver_name`, `size` bytes stored.
pub fn build(driver_name: &str, claim: &ClaimData, size: usize) -> Bytes {
    #[derive(serde::Serialize)]
    struct Json<'a> {
        #[serde(rename = "claimData")]
        claim_data: &'a ClaimData,
        #[serde(rename = "driverName")]
        driver_name: &'a str,
    }
    let data = serde_json::to_vec(&Json {
        claim_data: claim,
        driver_name,
    })
    .expect("a string map serializes");
    RefPayload {
        metadata: BTreeMap::from([
            ("encoding".to_owned(), ENCODING_JSON_PROTOBUF.to_vec()),
            ("messageType".to_owned(), REFERENCE_MESSAGE_TYPE.to_vec()),
        ]),
        data: Bytes::from(data),
        external_payloads: vec![ExternalPayloadDetails {
            size_bytes: size as i64,
        }],
    }
    .encode_to_vec()
    .into()
}

#[derive(Debug, PartialEq, Eq)]
enum MetaKind {
    Plain,
    Current,
    Legacy,
    Marked,
}

fn meta_kind(metadata: &BTreeMap<String, Vec<u8>>) -> MetaKind {
    if metadata.get(MARKER_KEY).map(Vec::as_slice) == Some(b"true") {
        return MetaKind::Marked;
    }
    match metadata.get("encoding").map(Vec::as_slice) {
        Some(ENCODING_LEGACY) => MetaKind::Legacy,
        Some(ENCODING_JSON_PROTOBUF)
            if metadata.get("messageType").map(Vec::as_slice) == Some(REFERENCE_MESSAGE_TYPE) =>
        {
            MetaKind::Current
        }
        _ => MetaKind::Plain,
    }
}

/// Classifies a serialized payload. `Err`: it is a reference but malformed.
pub fn classify(payload: &Bytes) -> Result<Kind, String> {
    let Ok(meta) = MetaOnly::decode(payload.as_ref()) else {
        // Not a payload we understand: leave it to the codec (which reports malformed input).
        return Ok(Kind::Plain);
    };
    match meta_kind(&meta.metadata) {
        MetaKind::Plain => Ok(Kind::Plain),
        MetaKind::Marked => {
            let mut full = RefPayload::decode(payload.as_ref())
                .map_err(|e| format!("malformed marked reference payload: {e}"))?;
            full.metadata.remove(MARKER_KEY);
            full.external_payloads.clear();
            Ok(Kind::Marked(full.encode_to_vec().into()))
        }
        kind => {
            let full = RefPayload::decode(payload.as_ref())
                .map_err(|e| format!("malformed reference payload: {e}"))?;
            let mut r = parse_json(&full.data, kind == MetaKind::Legacy, false)?;
            r.declared_size = full
                .external_payloads
                .first()
                .and_then(|d| u64::try_from(d.size_bytes).ok());
            Ok(Kind::Reference(r))
        }
    }
}

/// Parses the reference JSON. `strict`: unknown fields are refused (what may pass the
/// encode direction untouched must hold nothing but a reference).
fn parse_json(data: &[u8], legacy: bool, strict: bool) -> Result<Reference, String> {
    if legacy {
        #[derive(Deserialize)]
        struct Claim {
            claim_data: ClaimData,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct StrictClaim {
            #[allow(dead_code)]
            claim_data: ClaimData,
        }
        #[derive(Deserialize)]
        struct Legacy {
            driver_name: String,
            driver_claim: Claim,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct StrictLegacy {
            #[allow(dead_code)]
            driver_name: String,
            #[allow(dead_code)]
            driver_claim: StrictClaim,
        }
        if strict {
            serde_json::from_slice::<StrictLegacy>(data)
                .map_err(|e| format!("not exactly a legacy storage reference: {e}"))?;
        }
        let l: Legacy = serde_json::from_slice(data)
            .map_err(|e| format!("malformed legacy storage reference: {e}"))?;
        return Ok(Reference {
            driver_name: l.driver_name,
            claim: l.driver_claim.claim_data,
            declared_size: None,
        });
    }
    // proto3 JSON: parsers accept the lowerCamelCase and the original field names.
    #[derive(Deserialize)]
    struct Current {
        #[serde(rename = "driverName", alias = "driver_name", default)]
        driver_name: String,
        #[serde(rename = "claimData", alias = "claim_data", default)]
        claim_data: ClaimData,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StrictCurrent {
        #[serde(rename = "driverName", alias = "driver_name")]
        #[allow(dead_code)]
        driver_name: String,
        #[serde(rename = "claimData", alias = "claim_data")]
        #[allow(dead_code)]
        claim_data: ClaimData,
    }
    if strict {
        serde_json::from_slice::<StrictCurrent>(data)
            .map_err(|e| format!("not exactly a storage reference: {e}"))?;
    }
    let c: Current =
        serde_json::from_slice(data).map_err(|e| format!("malformed storage reference: {e}"))?;
    Ok(Reference {
        driver_name: c.driver_name,
        claim: c.claim_data,
        declared_size: None,
    })
}

/// Strict recognition for the encode direction: `payload` is a reference that may be
/// forwarded untouched only if it is *exactly* one — metadata holds only `encoding` and
/// `messageType` (current form) or `encoding` (legacy form), the JSON has no other fields,
/// at most one `external_payloads` entry, and no unknown protobuf fields anywhere. Whether
/// the driver is configured and the claim valid is the caller's check. `None`: not a
/// forwardable reference (the payload is then encoded like any other).
pub fn strict_reference(payload: &[u8]) -> Option<Reference> {
    // Metadata first (skips `data` without copying it): every payload of every encoded
    // message comes through here, and only references need the full decode.
    let kind = meta_kind(&MetaOnly::decode(payload).ok()?.metadata);
    let allowed: &[&str] = match kind {
        MetaKind::Current => &["encoding", "messageType"],
        MetaKind::Legacy => &["encoding"],
        MetaKind::Plain | MetaKind::Marked => return None,
    };
    let full = RefPayload::decode(payload).ok()?;
    if full.metadata.len() != allowed.len()
        || !full.metadata.keys().all(|k| allowed.contains(&k.as_str()))
        || full.external_payloads.len() > 1
    {
        return None;
    }
    // No bytes outside the fields parsed above (unknown fields could carry anything).
    if full.encode_to_vec().len() != payload.len() {
        return None;
    }
    let mut r = parse_json(&full.data, kind == MetaKind::Legacy, true).ok()?;
    r.declared_size = full
        .external_payloads
        .first()
        .and_then(|d| u64::try_from(d.size_bytes).ok());
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use temporalio_protos::temporal::api::common::v1::Payload;

    fn claim() -> ClaimData {
        ClaimData::from([
            ("bucket".to_owned(), "b".to_owned()),
            ("key".to_owned(), "v0/d/sha256/ab".to_owned()),
            ("hash_algorithm".to_owned(), "sha256".to_owned()),
            ("hash_value".to_owned(), "ab".to_owned()),
        ])
    }

    #[test]
    fn built_reference_matches_the_official_layout() {
        let bytes = build("aws.s3driver", &claim(), 1234);
        let p = Payload::decode(bytes.as_ref()).unwrap();
        assert_eq!(p.metadata["encoding"], b"json/protobuf");
        assert_eq!(
            p.metadata["messageType"],
            b"temporal.api.sdk.v1.ExternalStorageReference"
        );
        assert_eq!(
            std::str::from_utf8(&p.data).unwrap(),
            r#"{"claimData":{"bucket":"b","hash_algorithm":"sha256","hash_value":"ab","key":"v0/d/sha256/ab"},"driverName":"aws.s3driver"}"#
        );
        assert_eq!(p.external_payloads.len(), 1);
        assert_eq!(p.external_payloads[0].size_bytes, 1234);
        assert!(strict_reference(&bytes).is_some());
        match classify(&bytes).unwrap() {
            Kind::Reference(r) => {
                assert_eq!(r.driver_name, "aws.s3driver");
                assert_eq!(r.claim, claim());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn legacy_and_marked_forms_are_read() {
        let legacy = RefPayload {
            metadata: BTreeMap::from([("encoding".to_owned(), ENCODING_LEGACY.to_vec())]),
            data: Bytes::from(r#"{"driver_name":"d","driver_claim":{"claim_data":{"key":"k"}}}"#),
            external_payloads: vec![],
        }
        .encode_to_vec();
        match classify(&Bytes::from(legacy)).unwrap() {
            Kind::Reference(r) => {
                assert_eq!(r.driver_name, "d");
                assert_eq!(r.claim["key"], "k");
            }
            other => panic!("{other:?}"),
        }
        let marked = RefPayload {
            metadata: BTreeMap::from([
                ("encoding".to_owned(), b"binary/encrypted".to_vec()),
                (MARKER_KEY.to_owned(), b"true".to_vec()),
            ]),
            data: Bytes::from_static(b"ciphertext"),
            external_payloads: vec![ExternalPayloadDetails { size_bytes: 9 }],
        }
        .encode_to_vec();
        match classify(&Bytes::from(marked)).unwrap() {
            Kind::Marked(inner) => {
                let p = RefPayload::decode(inner.as_ref()).unwrap();
                assert!(!p.metadata.contains_key(MARKER_KEY));
                assert!(p.external_payloads.is_empty());
                assert_eq!(p.metadata["encoding"], b"binary/encrypted");
            }
            other => panic!("{other:?}"),
        }
        let plain = RefPayload {
            metadata: BTreeMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
            data: Bytes::from_static(b"1"),
            external_payloads: vec![],
        }
        .encode_to_vec();
        assert!(matches!(
            classify(&Bytes::from(plain.clone())).unwrap(),
            Kind::Plain
        ));
        assert!(strict_reference(&plain).is_none());
    }

    #[test]
    fn malformed_reference_is_an_error() {
        let bad = RefPayload {
            metadata: BTreeMap::from([
                ("encoding".to_owned(), ENCODING_JSON_PROTOBUF.to_vec()),
                ("messageType".to_owned(), REFERENCE_MESSAGE_TYPE.to_vec()),
            ]),
            data: Bytes::from_static(b"{not json"),
            external_payloads: vec![],
        }
        .encode_to_vec();
        assert!(classify(&Bytes::from(bad)).is_err());
    }

    #[test]
    fn strict_recognition_accepts_exact_references_only() {
        let exact = build("aws.s3driver", &claim(), 1234);
        let r = strict_reference(&exact).expect("a reference the gateway builds");
        assert_eq!(r.declared_size, Some(1234));
        let with = |metadata: Vec<(&str, &[u8])>, data: &str| {
            RefPayload {
                metadata: metadata
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_vec()))
                    .collect(),
                data: Bytes::from(data.to_owned()),
                external_payloads: vec![],
            }
            .encode_to_vec()
        };
        let current = vec![
            ("encoding", ENCODING_JSON_PROTOBUF),
            ("messageType", REFERENCE_MESSAGE_TYPE),
        ];
        assert!(
            strict_reference(&with(
                current.clone(),
                r#"{"driverName":"d","claimData":{}}"#
            ))
            .is_some()
        );
        assert!(
            strict_reference(&with(
                current.clone(),
                r#"{"driver_name":"d","claim_data":{}}"#
            ))
            .is_some()
        );
        let legacy = vec![("encoding", ENCODING_LEGACY)];
        assert!(
            strict_reference(&with(
                legacy.clone(),
                r#"{"driver_name":"d","driver_claim":{"claim_data":{}}}"#
            ))
            .is_some()
        );
        // Look-alikes: extra JSON fields, extra metadata, unknown protobuf fields, markers.
        for refused in [
            with(
                current.clone(),
                r#"{"driverName":"d","claimData":{},"s":"secret"}"#,
            ),
            with(current.clone(), r#"{"claimData":{}}"#),
            with(
                legacy.clone(),
                r#"{"driver_name":"x","driver_claim":{"claim_data":{}},"s":"secret"}"#,
            ),
            with(
                legacy,
                r#"{"driver_name":"x","driver_claim":{"claim_data":{},"s":"secret"}}"#,
            ),
            with(
                vec![
                    ("encoding", ENCODING_JSON_PROTOBUF),
                    ("messageType", REFERENCE_MESSAGE_TYPE),
                    ("note", b"secret"),
                ],
                r#"{"driverName":"d","claimData":{}}"#,
            ),
            with(
                vec![(MARKER_KEY, b"true"), ("encoding", b"json/plain")],
                "\"secret\"",
            ),
            with(vec![("encoding", b"json/plain")], "1"),
            [exact.to_vec(), vec![0x7a, 6], b"secret".to_vec()].concat(),
        ] {
            assert!(strict_reference(&refused).is_none(), "{refused:?}");
        }
    }
}
