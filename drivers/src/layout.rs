//! What every backend shares: the object key layout of Temporal's SDK drivers, content hashing,
//! and the parsing and validation of claims.
//!
//! Keys follow `temporalio.contrib.aws.s3driver` exactly (so the SDK's driver and the gateway
//! deduplicate into the same objects):
//!
//! - `v0/ns/{ns}/wt/{workflow-type}/wi/{workflow-id}/ri/{run-id}/d/sha256/{hex}` (workflow target)
//! - `v0/ns/{ns}/at/{activity-type}/ai/{activity-id}/ri/{run-id}/d/sha256/{hex}` (activity target)
//! - `v0/ns/{ns}/d/sha256/{hex}` when the key would exceed 1024 bytes, and when only the
//!   namespace is known (the gateway's choice: it keeps objects namespace-scoped)
//! - `v0/d/sha256/{hex}` when nothing is known.
//!
//! Segments are percent-encoded over UTF-8; missing or empty values are the literal `null`.
//! One deliberate deviation: a segment that would encode to `.` or `..` (an id that is exactly
//! a dot or two) is not written as a path component; the key falls back to the namespace form,
//! so no stored key ever contains a dot segment (which the filesystem backend could not hold
//! and which claim validation refuses).
//!
//! `gcp.gcsdriver` uses the same layout with its own segment encoding ([`Encoding::Gcs`]):
//! only characters that trouble GCS tooling are escaped, readable Unicode is kept, and a
//! segment of exactly `.` or `..` is escaped as `%2E`. The gateway's Azure driver uses the
//! S3 encoding ([`Encoding::Strict`]).

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

use crate::{ClaimData, DriverError, StoreContext, StoreTarget};

/// The only hash algorithm of Temporal's drivers.
pub const HASH_ALGORITHM: &str = "sha256";
/// Claim key of the hash algorithm.
pub const CLAIM_HASH_ALGORITHM: &str = "hash_algorithm";
/// Claim key of the lower-case hex digest.
pub const CLAIM_HASH_VALUE: &str = "hash_value";
/// Claim key of the bucket (`aws.s3driver`, `gcp.gcsdriver`).
pub const CLAIM_BUCKET: &str = "bucket";
/// Claim key of the object key (`aws.s3driver`, filesystem, memory).
pub const CLAIM_KEY: &str = "key";
/// Claim key of the object name (`gcp.gcsdriver`).
pub const CLAIM_OBJECT_NAME: &str = "object_name";
/// Claim key of the container (the gateway's `azure.blobdriver`).
pub const CLAIM_CONTAINER: &str = "container";
/// Claim key of the blob name (the gateway's `azure.blobdriver`).
pub const CLAIM_BLOB_NAME: &str = "blob_name";
/// Longest key in bytes before the namespace-scoped fallback is used (S3's limit).
pub const MAX_KEY_BYTES: usize = 1024;
/// Default largest serialized payload a driver stores (the SDK drivers' default, 50 MiB).
pub const DEFAULT_MAX_PAYLOAD_SIZE: u64 = 50 * 1024 * 1024;

/// What the SDK drivers escape in a key segment: everything but `0-9 a-z A-Z ! - _ . * ' ( )`.
const SEGMENT_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Percent-encodes one key segment like the SDK driver: every UTF-8 byte outside
/// `0-9 a-z A-Z ! - _ . * ' ( )` becomes `%XX` (upper-case hex). `None` for empty input.
pub fn percent_encode(value: Option<&str>) -> Option<String> {
    let value = value.filter(|v| !v.is_empty())?;
    Some(utf8_percent_encode(value, SEGMENT_ESCAPES).to_string())
}

/// Characters `gcp.gcsdriver` escapes in a segment besides control characters.
const GCS_UNSAFE: &str = "#[]*?:\"<>|/%";

/// Percent-encodes one key segment like `gcp.gcsdriver`: `# [ ] * ? : " < > | / %` and the
/// control characters U+0000-U+001F and U+007F-U+009F become `%XX` over their UTF-8 bytes
/// (upper-case hex), everything else is kept; a segment of exactly `.` or `..` becomes `%2E`
/// or `%2E%2E`. `None` for empty input.
pub fn gcs_percent_encode(value: Option<&str>) -> Option<String> {
    let value = value.filter(|v| !v.is_empty())?;
    let mut out = String::with_capacity(value.len());
    let mut utf8 = [0u8; 4];
    for c in value.chars() {
        let control = (c as u32) <= 0x1F || (0x7F..=0x9F).contains(&(c as u32));
        if control || GCS_UNSAFE.contains(c) {
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if is_dot_segment(&out) {
        out = out.replace('.', "%2E");
    }
    Some(out)
}

/// How the segments of an object key are percent-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `aws.s3driver`'s: every byte outside `0-9 a-z A-Z ! - _ . * ' ( )` ([`percent_encode`]).
    Strict,
    /// `gcp.gcsdriver`'s: readable Unicode kept ([`gcs_percent_encode`]).
    Gcs,
}

impl Encoding {
    /// Encodes one segment; `None` for empty input.
    pub fn encode(self, value: Option<&str>) -> Option<String> {
        match self {
            Encoding::Strict => percent_encode(value),
            Encoding::Gcs => gcs_percent_encode(value),
        }
    }
}

/// The claim layout of one driver type: which claim keys name the bucket and the object, and
/// how object keys are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// Claim key of the bucket or container.
    pub bucket_field: &'static str,
    /// Claim key of the object.
    pub key_field: KeyField,
    /// Segment encoding of object keys.
    pub encoding: Encoding,
}

impl Scheme {
    /// `aws.s3driver`, and the bucketless filesystem and memory backends.
    pub const S3: Scheme = Scheme {
        bucket_field: CLAIM_BUCKET,
        key_field: KeyField::Key,
        encoding: Encoding::Strict,
    };
    /// `gcp.gcsdriver`: `bucket`, `object_name`, GCS encoding.
    pub const GCS: Scheme = Scheme {
        bucket_field: CLAIM_BUCKET,
        key_field: KeyField::ObjectName,
        encoding: Encoding::Gcs,
    };
    /// The gateway's `azure.blobdriver`: `container`, `blob_name`, strict encoding.
    pub const AZURE: Scheme = Scheme {
        bucket_field: CLAIM_CONTAINER,
        key_field: KeyField::BlobName,
        encoding: Encoding::Strict,
    };
}

fn segment(value: &Option<String>, encoding: Encoding) -> String {
    encoding
        .encode(value.as_deref())
        .unwrap_or_else(|| "null".to_owned())
}

fn is_dot_segment(s: &str) -> bool {
    s == "." || s == ".."
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    lower_hex(&Sha256::digest(bytes))
}

fn lower_hex(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * digest.len());
    for &b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The object key for a payload whose SHA-256 is `hex`, stored for `context`
/// (`aws.s3driver` encoding).
pub fn object_key(context: &StoreContext, hex: &str) -> String {
    object_key_encoded(context, hex, Encoding::Strict)
}

/// The object key for a payload whose SHA-256 is `hex`, stored for `context`, with segments
/// encoded by `encoding`.
pub fn object_key_encoded(context: &StoreContext, hex: &str, encoding: Encoding) -> String {
    let digest = format!("/d/sha256/{hex}");
    let ns = segment(&context.namespace, encoding);
    if context.namespace.is_none() && context.target.is_none() {
        return format!("v0{digest}");
    }
    if is_dot_segment(&ns) {
        return format!("v0{digest}");
    }
    let ns_segment = format!("/ns/{ns}");
    let fallback = format!("v0{ns_segment}{digest}");
    let parts = match &context.target {
        None => return fallback,
        Some(StoreTarget::Workflow {
            workflow_type,
            workflow_id,
            run_id,
        }) => [
            ("wt", segment(workflow_type, encoding)),
            ("wi", segment(workflow_id, encoding)),
            ("ri", segment(run_id, encoding)),
        ],
        Some(StoreTarget::Activity {
            activity_type,
            activity_id,
            run_id,
        }) => [
            ("at", segment(activity_type, encoding)),
            ("ai", segment(activity_id, encoding)),
            ("ri", segment(run_id, encoding)),
        ],
    };
    if parts.iter().any(|(_, v)| is_dot_segment(v)) {
        return fallback;
    }
    let mut key = format!("v0{ns_segment}");
    for (tag, value) in &parts {
        key.push('/');
        key.push_str(tag);
        key.push('/');
        key.push_str(value);
    }
    key.push_str(&digest);
    if key.len() > MAX_KEY_BYTES {
        fallback
    } else {
        key
    }
}

/// Which claim field names the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    /// `key` (`aws.s3driver`, filesystem, memory).
    Key,
    /// `object_name` (`gcp.gcsdriver`).
    ObjectName,
    /// `blob_name` (the gateway's `azure.blobdriver`).
    BlobName,
}

impl KeyField {
    /// The claim key.
    pub fn name(self) -> &'static str {
        match self {
            KeyField::Key => CLAIM_KEY,
            KeyField::ObjectName => CLAIM_OBJECT_NAME,
            KeyField::BlobName => CLAIM_BLOB_NAME,
        }
    }
}

/// Which buckets a driver serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketPolicy {
    /// The backend has no buckets: a claim naming one is refused.
    None,
    /// A claim must name one of these buckets.
    OneOf(Vec<String>),
}

/// A claim that passed validation: the object it names and the hash it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidClaim {
    /// The bucket, for bucketed backends.
    pub bucket: Option<String>,
    /// The object key.
    pub key: String,
    /// Expected lower-case hex SHA-256.
    pub hash_value: String,
}

/// Builds the claim for an object stored at `key` (in `bucket`) with digest `hex`.
pub fn make_claim(bucket: Option<&str>, key_field: KeyField, key: &str, hex: &str) -> ClaimData {
    let scheme = Scheme {
        key_field,
        ..Scheme::S3
    };
    make_scheme_claim(&scheme, bucket, key, hex)
}

/// Builds the claim of `scheme` for an object stored at `key` (in `bucket`) with digest `hex`.
pub fn make_scheme_claim(scheme: &Scheme, bucket: Option<&str>, key: &str, hex: &str) -> ClaimData {
    let mut claim = ClaimData::new();
    if let Some(bucket) = bucket {
        claim.insert(scheme.bucket_field.to_owned(), bucket.to_owned());
    }
    claim.insert(scheme.key_field.name().to_owned(), key.to_owned());
    claim.insert(CLAIM_HASH_ALGORITHM.to_owned(), HASH_ALGORITHM.to_owned());
    claim.insert(CLAIM_HASH_VALUE.to_owned(), hex.to_owned());
    claim
}

/// Validates a claim before anything is fetched:
///
/// - the hash algorithm is `sha256` and the hash a 64-digit lower-case hex string (a missing
///   hash or an unknown algorithm is refused, never skipped);
/// - the bucket is one the driver serves;
/// - the key is relative, has no empty, `.` or `..` segment and no backslash or NUL, and starts
///   with `v0/`;
/// - a key under `v0/ns/{ns}/` belongs to the requesting `namespace` (percent-encoded as in
///   the layout); with no requesting namespace such keys are refused.
pub fn validate_claim(
    claim: &ClaimData,
    key_field: KeyField,
    buckets: &BucketPolicy,
    namespace: Option<&str>,
) -> Result<ValidClaim, DriverError> {
    let scheme = Scheme {
        key_field,
        ..Scheme::S3
    };
    validate_scheme_claim(claim, &scheme, buckets, namespace)
}

/// [`validate_claim`] for the claim layout and key encoding of `scheme`. Under
/// [`Encoding::Gcs`] a backslash in a key is allowed (`gcp.gcsdriver` writes it unescaped and
/// GCS object names have no separator but `/`); the namespace prefix is compared in the
/// scheme's encoding.
pub fn validate_scheme_claim(
    claim: &ClaimData,
    scheme: &Scheme,
    buckets: &BucketPolicy,
    namespace: Option<&str>,
) -> Result<ValidClaim, DriverError> {
    let key_field = scheme.key_field;
    let bucket_field = scheme.bucket_field;
    let refuse = |why: String| DriverError::ClaimRefused(why);
    match claim.get(CLAIM_HASH_ALGORITHM).map(String::as_str) {
        Some(HASH_ALGORITHM) => {}
        Some(other) => {
            return Err(refuse(format!(
                "unsupported hash algorithm {other:?} (expected sha256)"
            )));
        }
        None => return Err(refuse("claim has no hash_algorithm".to_owned())),
    }
    let hash_value = claim
        .get(CLAIM_HASH_VALUE)
        .ok_or_else(|| refuse("claim has no hash_value".to_owned()))?;
    if hash_value.len() != 64
        || !hash_value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(refuse(
            "hash_value is not a lower-case hex SHA-256".to_owned(),
        ));
    }
    let bucket = match (buckets, claim.get(bucket_field)) {
        (BucketPolicy::None, None) => None,
        (BucketPolicy::None, Some(b)) => {
            return Err(refuse(format!(
                "claim names {bucket_field} {b:?} but this driver has no buckets"
            )));
        }
        (BucketPolicy::OneOf(_), None) => {
            return Err(refuse(format!("claim has no {bucket_field}")));
        }
        (BucketPolicy::OneOf(allowed), Some(b)) => {
            if !allowed.iter().any(|a| a == b) {
                return Err(refuse(format!(
                    "{bucket_field} {b:?} is not configured for this driver"
                )));
            }
            Some(b.clone())
        }
    };
    let key = claim
        .get(key_field.name())
        .ok_or_else(|| refuse(format!("claim has no {}", key_field.name())))?;
    check_key_shape(key, scheme.encoding == Encoding::Strict)
        .map_err(|why| refuse(format!("key {key:?} {why}")))?;
    if let Some(rest) = key.strip_prefix("v0/ns/") {
        let key_ns = rest.split('/').next().unwrap_or_default();
        let own = scheme
            .encoding
            .encode(namespace)
            .unwrap_or_else(|| "null".to_owned());
        if namespace.is_none() || key_ns != own {
            return Err(refuse(format!(
                "key {key:?} lies outside the prefix of namespace {:?}",
                namespace.unwrap_or("")
            )));
        }
    }
    Ok(ValidClaim {
        bucket,
        key: key.clone(),
        hash_value: hash_value.clone(),
    })
}

fn check_key_shape(key: &str, refuse_backslash: bool) -> Result<(), &'static str> {
    if key.len() > MAX_KEY_BYTES {
        return Err("is longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return Err("is absolute");
    }
    if key.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if refuse_backslash && key.contains('\\') {
        return Err("contains a backslash");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("has an empty, `.` or `..` segment");
    }
    if !key.starts_with("v0/") {
        return Err("is not in the v0 layout");
    }
    Ok(())
}

/// Verifies fetched bytes against the claim's hash (in one piece: [`IncrementalHash`] over
/// one chunk).
pub fn verify(claim: &ValidClaim, bytes: &[u8]) -> Result<(), DriverError> {
    let mut hash = IncrementalHash::new(claim);
    hash.update(bytes);
    hash.finish()
}

/// The SHA-256 of an object taken as its bytes arrive, piece by piece, and checked against
/// the claim's hash once the last piece is in: the same digest as over the whole object,
/// wherever the pieces split it, so an object is never read a second time to be verified.
#[derive(Clone)]
pub struct IncrementalHash {
    hasher: Sha256,
    /// The claim's lower-case hex SHA-256.
    expected: String,
    /// The object key, for the error message.
    key: String,
}

impl std::fmt::Debug for IncrementalHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalHash")
            .field("expected", &self.expected)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl IncrementalHash {
    /// A hash of nothing yet, to be checked against `claim`'s.
    pub fn new(claim: &ValidClaim) -> Self {
        Self {
            hasher: Sha256::new(),
            expected: claim.hash_value.clone(),
            key: claim.key.clone(),
        }
    }

    /// Hashes the next `bytes` of the object.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// Compares the digest of everything hashed with the claim's: a mismatch is
    /// [`DriverError::Integrity`].
    pub fn finish(self) -> Result<(), DriverError> {
        let actual = lower_hex(&self.hasher.finalize());
        if actual == self.expected {
            Ok(())
        } else {
            Err(DriverError::Integrity(format!(
                "sha256 hash mismatch for {}: expected {}, got {actual}",
                self.key, self.expected
            )))
        }
    }
}

/// Refuses payloads above `limit` bytes.
pub fn check_size(len: usize, limit: u64) -> Result<(), DriverError> {
    if len as u64 > limit {
        Err(DriverError::TooLarge {
            size: len as u64,
            limit,
        })
    } else {
        Ok(())
    }
}

/// How large a fetched object may be: the driver's `max_payload_size` and, when the reference
/// declares one, its stored size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// The driver's largest payload.
    pub max: u64,
    /// The size the reference declares.
    pub declared: Option<u64>,
}

impl ReadLimit {
    /// Refuses an object of `size` bytes: larger than declared
    /// ([`DriverError::LargerThanDeclared`]), else larger than the driver's limit
    /// ([`DriverError::TooLarge`]).
    pub fn check(&self, size: u64) -> Result<(), DriverError> {
        match self.declared {
            Some(declared) if size > declared => {
                Err(DriverError::LargerThanDeclared { size, declared })
            }
            _ if size > self.max => Err(DriverError::TooLarge {
                size,
                limit: self.max,
            }),
            _ => Ok(()),
        }
    }

    /// The most bytes an accepted object has.
    pub fn bytes(&self) -> u64 {
        self.declared.map_or(self.max, |d| d.min(self.max))
    }
}

/// The body of an object as it is read: refused by its [`ReadLimit`] as soon as it grows past
/// it (a store that sent no length, or one smaller than the body), and hashed piece by piece
/// as each piece arrives ([`IncrementalHash`]), so [`finish`](Self::finish) hands out only
/// verified bytes and nothing reads the object a second time.
#[derive(Debug)]
pub struct BoundedBody {
    limit: ReadLimit,
    /// The first chunk, kept as is: a body that arrives in one piece is not copied.
    first: Option<Bytes>,
    rest: Vec<u8>,
    len: u64,
    /// Bytes to reserve once a second chunk arrives: the size the store announced, within
    /// the limit.
    expected: u64,
    hash: IncrementalHash,
}

/// How much [`BoundedBody::read_from`] reads before hashing what it read: small enough that
/// the bytes are still in the CPU's cache when they are hashed.
const READ_PIECE: u64 = 256 * 1024;

/// Bytes of an object whose SHA-256 matched its claim's: only [`BoundedBody::finish`] makes
/// one, so a driver's [`get`](crate::StorageDriver::get) cannot hand out bytes that were not
/// verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified(Bytes);

impl Verified {
    /// The verified bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Their length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl BoundedBody {
    /// An empty body for the object `claim` names, which the store says has `size_hint`
    /// bytes; its bytes must hash to the claim's hash.
    pub fn new(claim: &ValidClaim, limit: ReadLimit, size_hint: u64) -> Self {
        Self {
            limit,
            first: None,
            rest: Vec::new(),
            len: 0,
            expected: size_hint.min(limit.bytes()),
            hash: IncrementalHash::new(claim),
        }
    }

    /// Appends `chunk` and hashes it, or refuses the object if the body would exceed the
    /// limit.
    pub fn push(&mut self, chunk: Bytes) -> Result<(), DriverError> {
        let len = self.len.saturating_add(chunk.len() as u64);
        self.limit.check(len)?;
        self.len = len;
        self.hash.update(&chunk);
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
            return Ok(());
        }
        self.spill_first(len);
        self.rest.extend_from_slice(&chunk);
        Ok(())
    }

    /// Moves a kept first chunk into the buffer, reserving what the store announced.
    fn spill_first(&mut self, len: u64) {
        if let Some(first) = self.first.take() {
            // Up front at most what was announced (and 64 MiB): the rest grows as read.
            let total = self.expected.max(len).min(64 << 20);
            self.rest.reserve(total as usize);
            self.rest.extend_from_slice(&first);
        }
    }

    /// Reads `reader` to its end straight into the body's buffer (sized from the announced
    /// size), hashing each piece as it is read; reads at most one byte past the limit, and
    /// refuses the object as soon as it passes it. `io_error` names a failed read.
    pub fn read_from(
        &mut self,
        reader: impl std::io::Read,
        io_error: impl Fn(std::io::Error) -> DriverError,
    ) -> Result<(), DriverError> {
        use std::io::Read;
        self.spill_first(self.len);
        let left = self.limit.bytes().saturating_sub(self.len);
        let mut reader = reader.take(left.saturating_add(1));
        let want = usize::try_from(self.expected.saturating_sub(self.len)).unwrap_or(0);
        self.rest.reserve_exact(want);
        loop {
            let start = self.rest.len();
            let n = (&mut reader)
                .take(READ_PIECE)
                .read_to_end(&mut self.rest)
                .map_err(&io_error)?;
            if n == 0 {
                return Ok(());
            }
            self.len = self.len.saturating_add(n as u64);
            self.limit.check(self.len)?;
            self.hash.update(&self.rest[start..]);
        }
    }

    /// The whole body, if its SHA-256 is the claim's ([`DriverError::Integrity`] if not).
    pub fn finish(self) -> Result<Verified, DriverError> {
        self.hash.finish()?;
        Ok(Verified(match self.first {
            Some(first) => first,
            None => Bytes::from(self.rest),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected keys computed with temporalio 1.35.0's S3StorageDriver.store for the payload
    // `Payload(metadata={"encoding": b"binary/plain"}, data=b"hello")`.
    const PAYLOAD_HEX: &str = "0a180a08656e636f64696e67120c62696e6172792f706c61696e120568656c6c6f";
    const DIGEST: &str = "1828305a9756aef285dcfe76b2fd3089d886012319959c3f7d6c73f695c4061f";

    fn payload() -> Vec<u8> {
        (0..PAYLOAD_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&PAYLOAD_HEX[i..i + 2], 16).unwrap())
            .collect()
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    fn wf(ns: &str, ty: Option<String>, id: Option<String>, run: Option<String>) -> StoreContext {
        StoreContext {
            namespace: Some(ns.to_owned()),
            target: Some(StoreTarget::Workflow {
                workflow_type: ty,
                workflow_id: id,
                run_id: run,
            }),
        }
    }

    #[test]
    fn digest_matches_sdk() {
        assert_eq!(sha256_hex(&payload()), DIGEST);
    }

    #[test]
    fn keys_match_sdk() {
        let cases = [
            (StoreContext::default(), format!("v0/d/sha256/{DIGEST}")),
            (
                wf("default", s("MyWorkflow"), s("my wf/1"), s("r-1")),
                format!("v0/ns/default/wt/MyWorkflow/wi/my%20wf%2F1/ri/r-1/d/sha256/{DIGEST}"),
            ),
            (
                wf("ns.é", s("T(x)*'!"), s("ü~+%&=?#"), None),
                format!(
                    "v0/ns/ns.%C3%A9/wt/T(x)*'!/wi/%C3%BC%7E%2B%25%26%3D%3F%23/ri/null/d/sha256/{DIGEST}"
                ),
            ),
            (
                wf("", None, s(""), s("")),
                format!("v0/ns/null/wt/null/wi/null/ri/null/d/sha256/{DIGEST}"),
            ),
            (
                StoreContext {
                    namespace: s("default"),
                    target: Some(StoreTarget::Activity {
                        activity_type: s("say_hello"),
                        activity_id: s("1"),
                        run_id: None,
                    }),
                },
                format!("v0/ns/default/at/say_hello/ai/1/ri/null/d/sha256/{DIGEST}"),
            ),
            (
                wf("default", s("T"), Some("x".repeat(1000)), s("r")),
                format!("v0/ns/default/d/sha256/{DIGEST}"),
            ),
            (
                wf("n", s("T"), Some("é".repeat(300)), s("r")),
                format!("v0/ns/n/d/sha256/{DIGEST}"),
            ),
        ];
        for (ctx, expected) in cases {
            assert_eq!(
                object_key(&ctx, &sha256_hex(&payload())),
                expected,
                "{ctx:?}"
            );
        }
    }

    // Expected names computed with temporalio 1.35.0's GCSStorageDriver.store for the same
    // payload.
    #[test]
    fn gcs_names_match_sdk() {
        let act = |ns: &str, ty: &str, id: &str| StoreContext {
            namespace: s(ns),
            target: Some(StoreTarget::Activity {
                activity_type: s(ty),
                activity_id: s(id),
                run_id: None,
            }),
        };
        let cases = [
            (StoreContext::default(), format!("v0/d/sha256/{DIGEST}")),
            (
                wf("default", s("MyWorkflow"), s("my wf/1"), s("r-1")),
                format!("v0/ns/default/wt/MyWorkflow/wi/my wf%2F1/ri/r-1/d/sha256/{DIGEST}"),
            ),
            (
                wf("ns.é", s("T(x)*'!"), s("ü~+%&=?#"), None),
                format!("v0/ns/ns.é/wt/T(x)%2A'!/wi/ü~+%25&=%3F%23/ri/null/d/sha256/{DIGEST}"),
            ),
            (
                wf("", None, s(""), s("")),
                format!("v0/ns/null/wt/null/wi/null/ri/null/d/sha256/{DIGEST}"),
            ),
            (
                act("default", "say_hello", "1"),
                format!("v0/ns/default/at/say_hello/ai/1/ri/null/d/sha256/{DIGEST}"),
            ),
            (
                wf("default", s("T"), Some("x".repeat(1000)), s("r")),
                format!("v0/ns/default/d/sha256/{DIGEST}"),
            ),
            (
                wf("n", s("T"), Some("é".repeat(300)), s("r")),
                format!("v0/ns/n/wt/T/wi/{}/ri/r/d/sha256/{DIGEST}", "é".repeat(300)),
            ),
            (
                wf(".", s(".."), s("a\\b[c]:\u{1}\u{7f}\u{85}"), s(".")),
                format!(
                    "v0/ns/%2E/wt/%2E%2E/wi/a\\b%5Bc%5D%3A%01%7F%C2%85/ri/%2E/d/sha256/{DIGEST}"
                ),
            ),
        ];
        for (ctx, expected) in cases {
            let key = object_key_encoded(&ctx, &sha256_hex(&payload()), Encoding::Gcs);
            assert_eq!(key, expected, "{ctx:?}");
        }
    }

    #[test]
    fn gcs_claims_validate_in_their_own_encoding() {
        let buckets = buckets();
        let check = |key: &str, ns: Option<&str>| {
            let claim = make_scheme_claim(&Scheme::GCS, Some("b"), key, DIGEST);
            validate_scheme_claim(&claim, &Scheme::GCS, &buckets, ns)
        };
        // What the SDK writes for a namespace with Unicode, and a backslash in an id.
        check(
            &format!("v0/ns/ns.é/wt/T/wi/a\\b/ri/r/d/sha256/{DIGEST}"),
            Some("ns.é"),
        )
        .unwrap();
        // The S3 form of the same namespace is another prefix under the GCS scheme.
        assert!(check(&format!("v0/ns/ns.%C3%A9/d/sha256/{DIGEST}"), Some("ns.é")).is_err());
        for key in [
            format!("v0/ns/other/d/sha256/{DIGEST}"),
            format!("v0/ns/ns.é/../other/d/sha256/{DIGEST}"),
            format!("v0/ns/ns.é/d/sha256/{DIGEST}\u{0}"),
        ] {
            assert!(
                matches!(check(&key, Some("ns.é")), Err(DriverError::ClaimRefused(_))),
                "{key}"
            );
        }
        // The claim keys are the scheme's: an S3-shaped claim has no object_name.
        let s3 = claim(Some("b"), &format!("v0/d/sha256/{DIGEST}"));
        assert!(validate_scheme_claim(&s3, &Scheme::GCS, &buckets, None).is_err());
        let az = make_scheme_claim(
            &Scheme::AZURE,
            Some("b"),
            &format!("v0/d/sha256/{DIGEST}"),
            DIGEST,
        );
        assert_eq!(
            az.keys().map(String::as_str).collect::<Vec<_>>(),
            ["blob_name", "container", "hash_algorithm", "hash_value"]
        );
        validate_scheme_claim(&az, &Scheme::AZURE, &buckets, None).unwrap();
        let mut wrong = az.clone();
        wrong.insert(CLAIM_CONTAINER.to_owned(), "evil".to_owned());
        assert!(validate_scheme_claim(&wrong, &Scheme::AZURE, &buckets, None).is_err());
    }

    #[test]
    fn gateway_specific_keys() {
        let ns_only = StoreContext {
            namespace: s("default"),
            target: None,
        };
        assert_eq!(
            object_key(&ns_only, DIGEST),
            format!("v0/ns/default/d/sha256/{DIGEST}")
        );
        assert_eq!(
            object_key(&wf("default", s("T"), s(".."), s("r")), DIGEST),
            format!("v0/ns/default/d/sha256/{DIGEST}")
        );
    }

    fn claim(bucket: Option<&str>, key: &str) -> ClaimData {
        make_claim(bucket, KeyField::Key, key, DIGEST)
    }

    fn buckets() -> BucketPolicy {
        BucketPolicy::OneOf(vec!["b".to_owned()])
    }

    #[test]
    fn valid_claims_pass() {
        let key = format!("v0/ns/default/wt/T/wi/w/ri/r/d/sha256/{DIGEST}");
        let v = validate_claim(
            &claim(Some("b"), &key),
            KeyField::Key,
            &buckets(),
            Some("default"),
        )
        .unwrap();
        assert_eq!(v.key, key);
        let anon = format!("v0/d/sha256/{DIGEST}");
        validate_claim(
            &claim(Some("b"), &anon),
            KeyField::Key,
            &buckets(),
            Some("x"),
        )
        .unwrap();
        validate_claim(
            &claim(None, &anon),
            KeyField::Key,
            &BucketPolicy::None,
            None,
        )
        .unwrap();
        let enc = format!("v0/ns/ns.%C3%A9/d/sha256/{DIGEST}");
        validate_claim(
            &claim(Some("b"), &enc),
            KeyField::Key,
            &buckets(),
            Some("ns.é"),
        )
        .unwrap();
    }

    #[test]
    fn forged_claims_are_refused() {
        let other_ns = format!("v0/ns/other/d/sha256/{DIGEST}");
        let refused = |c: &ClaimData, ns: Option<&str>| {
            matches!(
                validate_claim(c, KeyField::Key, &buckets(), ns),
                Err(DriverError::ClaimRefused(_))
            )
        };
        assert!(refused(&claim(Some("b"), &other_ns), Some("default")));
        assert!(refused(&claim(Some("b"), &other_ns), None));
        assert!(refused(
            &claim(Some("evil"), &format!("v0/d/sha256/{DIGEST}")),
            None
        ));
        assert!(refused(
            &claim(None, &format!("v0/d/sha256/{DIGEST}")),
            None
        ));
        for key in [
            format!("v0/ns/default/../other/d/sha256/{DIGEST}"),
            format!("/v0/ns/default/d/sha256/{DIGEST}"),
            "v0/ns/default/./x".to_owned(),
            "v0//x".to_owned(),
            "v0/ns/default/a\\..\\b".to_owned(),
            "etc/passwd".to_owned(),
            "..".to_owned(),
        ] {
            assert!(refused(&claim(Some("b"), &key), Some("default")), "{key}");
        }
        let mut c = claim(Some("b"), &other_ns);
        c.remove(CLAIM_HASH_VALUE);
        assert!(refused(&c, Some("other")));
        let mut c = claim(Some("b"), &other_ns);
        c.insert(CLAIM_HASH_ALGORITHM.to_owned(), "md5".to_owned());
        assert!(refused(&c, Some("other")));
        let mut c = claim(Some("b"), &other_ns);
        c.remove(CLAIM_HASH_ALGORITHM);
        assert!(refused(&c, Some("other")));
        let mut c = claim(Some("b"), &other_ns);
        c.insert(CLAIM_HASH_VALUE.to_owned(), DIGEST.to_uppercase());
        assert!(refused(&c, Some("other")));
        // A bucketless backend refuses a claim that names a bucket.
        assert!(matches!(
            validate_claim(
                &claim(Some("b"), &other_ns),
                KeyField::Key,
                &BucketPolicy::None,
                Some("other")
            ),
            Err(DriverError::ClaimRefused(_))
        ));
    }

    #[test]
    fn verify_detects_mismatch() {
        let v = ValidClaim {
            bucket: None,
            key: "k".to_owned(),
            hash_value: DIGEST.to_owned(),
        };
        verify(&v, &payload()).unwrap();
        let mut bad = payload();
        bad[3] ^= 1;
        let err = verify(&v, &bad).unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
    }

    #[test]
    fn size_limit_is_clear() {
        let err = check_size(11, 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload of 11 bytes exceeds the storage limit of 10 bytes"
        );
    }

    #[test]
    fn read_limit_refuses_past_the_declared_size_first() {
        let limit = ReadLimit {
            max: 100,
            declared: Some(10),
        };
        assert_eq!(limit.bytes(), 10);
        limit.check(10).unwrap();
        assert!(matches!(
            limit.check(11),
            Err(DriverError::LargerThanDeclared {
                size: 11,
                declared: 10
            })
        ));
        assert!(matches!(
            limit.check(101),
            Err(DriverError::LargerThanDeclared { .. })
        ));
        let undeclared = ReadLimit {
            max: 100,
            declared: None,
        };
        assert_eq!(undeclared.bytes(), 100);
        assert!(matches!(
            undeclared.check(101),
            Err(DriverError::TooLarge {
                size: 101,
                limit: 100
            })
        ));
        let over_max = ReadLimit {
            max: 100,
            declared: Some(1000),
        };
        assert_eq!(over_max.bytes(), 100);
        assert!(matches!(
            over_max.check(101),
            Err(DriverError::TooLarge { .. })
        ));
    }

    /// A claim on `bytes` (key `k`).
    fn claim_on(bytes: &[u8]) -> ValidClaim {
        ValidClaim {
            bucket: None,
            key: "k".to_owned(),
            hash_value: sha256_hex(bytes),
        }
    }

    #[test]
    fn bounded_body_stops_at_the_limit() {
        let limit = ReadLimit {
            max: 100,
            declared: Some(8),
        };
        let claim = claim_on(b"12345678");
        let mut one = BoundedBody::new(&claim, limit, 8);
        one.push(Bytes::from_static(b"12345678")).unwrap();
        assert_eq!(
            one.finish().unwrap().into_bytes(),
            Bytes::from_static(b"12345678")
        );
        let mut parts = BoundedBody::new(&claim, limit, 0);
        parts.push(Bytes::from_static(b"1234")).unwrap();
        parts.push(Bytes::from_static(b"5678")).unwrap();
        assert!(matches!(
            parts.push(Bytes::from_static(b"9")),
            Err(DriverError::LargerThanDeclared {
                size: 9,
                declared: 8
            })
        ));
        assert_eq!(
            parts.finish().unwrap().into_bytes(),
            Bytes::from_static(b"12345678")
        );
        // Read from a file-like reader: one byte past the limit is all that is read.
        let mut read = BoundedBody::new(&claim, limit, 8);
        let mut source = std::io::Cursor::new(vec![b'x'; 1000]);
        let err = read
            .read_from(&mut source, |e| DriverError::Unavailable(e.to_string()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::LargerThanDeclared {
                    size: 9,
                    declared: 8
                }
            ),
            "{err}"
        );
        assert_eq!(source.position(), 9);
    }

    /// A reader that hands out at most `step` bytes per read (a socket, a pipe).
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// The digest taken chunk by chunk is the digest of the whole, wherever the chunks split
    /// the object: at every byte of it (inside and across SHA-256's 64-byte blocks), in many
    /// small chunks, and read in short reads. One changed byte anywhere, and an object cut
    /// short or grown by a byte, is the hash error, however it is split.
    #[test]
    fn the_incremental_hash_does_not_depend_on_chunk_boundaries() {
        let object: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        let claim = claim_on(&object);
        let limit = ReadLimit {
            max: 1 << 20,
            declared: None,
        };
        let pushed = |chunks: &[&[u8]]| {
            let mut body = BoundedBody::new(&claim, limit, object.len() as u64);
            for c in chunks {
                body.push(Bytes::copy_from_slice(c)).unwrap();
            }
            body.finish()
        };
        for at in 0..=object.len() {
            let (a, b) = object.split_at(at);
            assert_eq!(
                pushed(&[a, b]).unwrap().into_bytes(),
                object,
                "split at {at}"
            );
            for j in [at / 2, at.saturating_sub(64), at.saturating_sub(1)] {
                let (a0, a1) = a.split_at(j);
                assert_eq!(pushed(&[a0, a1, b]).unwrap().len(), object.len());
            }
            let mut bad = object.clone();
            if at < bad.len() {
                bad[at] ^= 0x80;
                let (a, b) = bad.split_at(at);
                let err = pushed(&[a, b]).unwrap_err();
                assert!(matches!(err, DriverError::Integrity(_)), "{err}");
                assert!(err.to_string().contains("hash mismatch for k"), "{err}");
            }
        }
        for step in [1, 3, 63, 64, 65, 299, 300] {
            let chunks: Vec<&[u8]> = object.chunks(step).collect();
            assert!(pushed(&chunks).is_ok(), "chunks of {step}");
            let mut read = BoundedBody::new(&claim, limit, object.len() as u64);
            read.read_from(
                Trickle {
                    data: &object,
                    step,
                },
                |e| DriverError::Unavailable(e.to_string()),
            )
            .unwrap();
            assert_eq!(
                read.finish().unwrap().into_bytes(),
                object,
                "reads of {step}"
            );
        }
        let short = pushed(&[&object[..299]]).unwrap_err();
        assert!(matches!(short, DriverError::Integrity(_)), "{short}");
        let long = pushed(&[&object, b"!"]).unwrap_err();
        assert!(matches!(long, DriverError::Integrity(_)), "{long}");
        // The one-piece check is the same check.
        verify(&claim, &object).unwrap();
        let mut incremental = IncrementalHash::new(&claim);
        for c in object.chunks(7) {
            incremental.update(c);
        }
        incremental.finish().unwrap();
    }
}
