//! The `temporal.api.common.v1.Payload` wire format, as far as the codec needs it.
//!
//! Outer payloads are built as `metadata (field 1) ‖ data (field 2)`: the metadata part is
//! encoded by prost from [`WirePayload`] once (it is constant per layer and key), the data
//! field header is appended by hand so the data itself can be written straight into the
//! output buffer (compressed or encrypted in place) instead of being copied into a message.
//! The result is byte-for-byte what prost would encode for the same message (tested).
//!
//! Reading uses [`scan`], a zero-copy pass that only looks at the two metadata entries the
//! codec cares about and borrows `data`, so a payload that is not ours costs no allocation.

use bytes::Bytes;

/// Metadata key of the encoding.
pub(crate) const ENCODING_KEY: &str = "encoding";
/// Metadata key of the encryption key id.
pub(crate) const KEY_ID_KEY: &str = "encryption-key-id";
/// Metadata key of the wrapped data key of an envelope-encrypted payload (opaque bytes from
/// the key service).
pub(crate) const DEK_KEY: &str = "encryption-dek";
/// Metadata key of the data key's id (32 lowercase hex digits) of an envelope-encrypted payload.
pub(crate) const DEK_ID_KEY: &str = "encryption-dek-id";
/// Encoding of the compression layer.
pub(crate) const ENCODING_ZSTD: &[u8] = b"binary/zstd";
/// Encoding of the encryption layer (Temporal's sample encryption codec).
pub(crate) const ENCODING_ENCRYPTED: &[u8] = b"binary/encrypted";

pub use crate::payload::Payload as WirePayload;

/// Upper bound of [`data_header`]'s length: one key byte and a 10-byte varint.
pub(crate) const DATA_HEADER_MAX: usize = 11;

/// The metadata part of an outer payload: the prost encoding of `entries` with empty data.
pub(crate) fn metadata_prefix(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use prost::Message;
    WirePayload {
        metadata: entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect(),
        data: Bytes::new(),
        external_payloads: Vec::new(),
    }
    .encode_to_vec()
}

/// The key and length of field 2 (`data`, length-delimited) for `len` bytes of data.
pub(crate) fn data_header(len: usize) -> ([u8; DATA_HEADER_MAX], usize) {
    let mut out = [0u8; DATA_HEADER_MAX];
    out[0] = (2 << 3) | 2;
    let mut n = 1;
    let mut v = len as u64;
    while v >= 0x80 {
        out[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    out[n] = v as u8;
    (out, n + 1)
}

/// What [`scan`] found in a serialized payload.
#[derive(Debug, Default)]
pub(crate) struct Scan<'a> {
    /// `metadata["encoding"]`.
    pub encoding: Option<&'a [u8]>,
    /// `metadata["encryption-key-id"]`.
    pub key_id: Option<&'a [u8]>,
    /// `metadata["encryption-dek"]` (envelope encryption).
    pub dek: Option<&'a [u8]>,
    /// `metadata["encryption-dek-id"]` (envelope encryption).
    pub dek_id: Option<&'a [u8]>,
    /// `data` (empty when absent).
    pub data: &'a [u8],
}

/// Reads the encoding, the key id, the envelope fields and the data of a serialized payload without copying.
///
/// Protobuf semantics: the last occurrence of a field or map key wins; unknown fields are
/// skipped; groups and invalid wire types are refused.
pub(crate) fn scan(buf: &[u8]) -> Result<Scan<'_>, String> {
    let mut scan = Scan::default();
    let mut rest = buf;
    while !rest.is_empty() {
        let (field, value) = next_field(&mut rest)?;
        match (field, value) {
            (1, Field::Bytes(entry)) => {
                let (k, v) = map_entry(entry)?;
                if k == ENCODING_KEY.as_bytes() {
                    scan.encoding = Some(v);
                } else if k == KEY_ID_KEY.as_bytes() {
                    scan.key_id = Some(v);
                } else if k == DEK_KEY.as_bytes() {
                    scan.dek = Some(v);
                } else if k == DEK_ID_KEY.as_bytes() {
                    scan.dek_id = Some(v);
                }
            }
            (2, Field::Bytes(data)) => scan.data = data,
            (1 | 2, _) => return Err(format!("field {field} has the wrong wire type")),
            _ => {}
        }
    }
    Ok(scan)
}

enum Field<'a> {
    Bytes(&'a [u8]),
    Other,
}

fn map_entry(mut entry: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    while !entry.is_empty() {
        match next_field(&mut entry)? {
            (1, Field::Bytes(k)) => key = k,
            (2, Field::Bytes(v)) => value = v,
            (1 | 2, _) => return Err("metadata entry has the wrong wire type".to_owned()),
            _ => {}
        }
    }
    Ok((key, value))
}

fn next_field<'a>(rest: &mut &'a [u8]) -> Result<(u64, Field<'a>), String> {
    let key = varint(rest)?;
    let field = key >> 3;
    if field == 0 {
        return Err("field number 0".to_owned());
    }
    let value = match key & 7 {
        0 => {
            varint(rest)?;
            Field::Other
        }
        1 => {
            take(rest, 8)?;
            Field::Other
        }
        2 => {
            let len = varint(rest)?;
            let len = usize::try_from(len).map_err(|_| "length overflows".to_owned())?;
            Field::Bytes(take(rest, len)?)
        }
        5 => {
            take(rest, 4)?;
            Field::Other
        }
        wt => return Err(format!("unsupported wire type {wt} for field {field}")),
    };
    Ok((field, value))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if rest.len() < n {
        return Err("truncated".to_owned());
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn varint(rest: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&b, tail)) = rest.split_first() else {
            return Err("truncated varint".to_owned());
        };
        *rest = tail;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err("varint too long".to_owned())
}
