//! `temporal.api.common.v1.Payload` as the gateway builds and reads it whole: the payloads it
//! creates (encryption and compression layers, storage references) and the ones the codec
//! endpoint exchanges. User payloads crossing the gRPC path are never decoded into this type
//! (that would drop unknown fields): they are handled as bytes.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

/// `temporal.api.common.v1.Payload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// `map<string, bytes> metadata = 1`.
    #[prost(btree_map = "string, bytes", tag = "1")]
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// `bytes data = 2`.
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
    /// `repeated ExternalPayloadDetails external_payloads = 3`.
    #[prost(message, repeated, tag = "3")]
    pub external_payloads: Vec<ExternalPayloadDetails>,
}

/// `temporal.api.common.v1.Payload.ExternalPayloadDetails`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExternalPayloadDetails {
    /// `int64 size_bytes = 1`.
    #[prost(int64, tag = "1")]
    pub size_bytes: i64,
}

impl Payload {
    /// The serialized protobuf form.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// Parses the serialized protobuf form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        Self::decode(bytes).map_err(|e| format!("not a Payload message: {e}"))
    }

    /// The metadata value of `key` as text, when present and UTF-8.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}
