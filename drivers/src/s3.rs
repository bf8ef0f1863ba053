//! `aws.s3driver`-compatible storage on Amazon S3 or an S3-compatible server, via `aws-sdk-s3`.
//!
//! Wire-compatible with `temporalio.contrib.aws.s3driver`: same key layout, same claim
//! (`bucket`, `key`, `hash_algorithm`, `hash_value`), HeadObject then PutObject only when the
//! object is absent, SHA-256 verified on every GetObject.
//!
//! Objects of [`PartUploads::threshold`] bytes or more go up as a multipart upload instead of
//! one PutObject: parts of [`PartUploads::part_size`] bytes, [`PartUploads::concurrency`] at a
//! time, sliced from the payload without copying; the completion is conditional
//! (`If-None-Match: *`), and an upload that fails is aborted. Off by default: on this
//! repository's loopback benchmark (BENCHMARKS.md, "Concurrent part uploads") parts did not
//! speed up `s3s-fs`.
//!
//! Credentials come from the standard AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
//! profiles, web identity, instance metadata). Request checksums are only computed when an
//! operation requires them: several S3-compatible servers refuse the SDK's default CRC
//! trailers.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use crate::layout::{self, BoundedBody, BucketPolicy, ReadLimit, Scheme, ValidClaim};
use crate::{DriverError, DriverSettings, ListedObject, StorageDriver, Verified};

/// The driver name and type of Temporal's S3 driver.
pub const S3_DRIVER_TYPE: &str = "aws.s3driver";

/// Settings of an S3 driver.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Name written into references; `aws.s3driver` for SDK interop.
    pub name: String,
    /// Bucket new payloads are written to (must exist).
    pub bucket: String,
    /// Further buckets whose claims are resolved (the write bucket always is).
    pub read_buckets: Vec<String>,
    /// Region; else the AWS chain's, else `us-east-1`.
    pub region: Option<String>,
    /// Custom endpoint (MinIO, s3s, LocalStack, ...).
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers.
    pub force_path_style: bool,
    /// Largest serialized payload stored or fetched, in bytes.
    pub max_payload_size: u64,
    /// Concurrent requests per batch.
    pub concurrency: usize,
    /// Timeout of one S3 operation including retries.
    pub operation_timeout: Duration,
    /// When and how objects go up as multipart uploads.
    pub parts: PartUploads,
}

/// Multipart uploads of large objects: from which size, in parts of which size, how many at a
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartUploads {
    /// Objects of this many bytes or more are uploaded in parts; `u64::MAX`: never.
    pub threshold: u64,
    /// Bytes per part (the last one may be smaller); at least [`MIN_PART_SIZE`]. Raised for an
    /// object that would need more than [`MAX_PARTS`] parts.
    pub part_size: u64,
    /// Parts uploaded at the same time (at least 1).
    pub concurrency: usize,
}

/// S3's smallest part but the last (5 MiB).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's largest part number.
pub const MAX_PARTS: u64 = 10_000;

impl Default for PartUploads {
    /// Off (`threshold = u64::MAX`); when turned on: 8 MiB parts, 4 at a time.
    fn default() -> Self {
        Self {
            threshold: u64::MAX,
            part_size: 8 << 20,
            concurrency: 4,
        }
    }
}

impl PartUploads {
    /// The part size for an object of `len` bytes: the configured one, at least
    /// [`MIN_PART_SIZE`], raised so that no more than [`MAX_PARTS`] parts are needed.
    pub fn part_size_for(&self, len: u64) -> u64 {
        self.part_size
            .max(MIN_PART_SIZE)
            .max(len.div_ceil(MAX_PARTS))
    }

    /// Whether an object of `len` bytes goes up in parts: at or past the threshold, and more
    /// than one part long.
    pub fn applies_to(&self, len: u64) -> bool {
        len >= self.threshold && len > self.part_size_for(len)
    }
}

impl S3Config {
    /// Defaults for `bucket`: driver name `aws.s3driver`, 50 MiB limit.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            name: S3_DRIVER_TYPE.to_owned(),
            bucket: bucket.into(),
            read_buckets: Vec::new(),
            region: None,
            endpoint: None,
            force_path_style: false,
            max_payload_size: layout::DEFAULT_MAX_PAYLOAD_SIZE,
            concurrency: 16,
            operation_timeout: Duration::from_secs(60),
            parts: PartUploads::default(),
        }
    }
}

/// Stores payloads in S3.
#[derive(Debug)]
pub struct S3Driver {
    client: Client,
    settings: DriverSettings,
    parts: PartUploads,
}

impl S3Driver {
    /// Builds the client (loading region and credentials from the AWS chain).
    pub async fn new(config: S3Config) -> Self {
        let region = RegionProviderChain::first_try(config.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new("us-east-1"));
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(config.operation_timeout)
                    .build(),
            )
            .load()
            .await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let client = Client::from_conf(builder.build());
        let mut buckets = vec![config.bucket.clone()];
        buckets.extend(config.read_buckets.iter().cloned());
        Self {
            client,
            settings: DriverSettings {
                name: config.name,
                scheme: Scheme::S3,
                buckets: BucketPolicy::OneOf(buckets),
                max_payload_size: config.max_payload_size,
                concurrency: config.concurrency,
            },
            parts: config.parts,
        }
    }
}
/// Maps an SDK error: everything but a refused claim is worth retrying later.
fn classify<E, R>(op: &str, bucket: &str, key: &str, e: SdkError<E, R>) -> DriverError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let detail = match &e {
        SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("error"),
            se.err().message().unwrap_or("")
        ),
        SdkError::DispatchFailure(d) => format!("cannot reach the server: {d:?}"),
        SdkError::TimeoutError(_) => "timed out".to_owned(),
        other => format!("{}", aws_sdk_s3::error::DisplayErrorContext(other)),
    };
    DriverError::Unavailable(format!("{op} s3://{bucket}/{key}: {detail}"))
}

/// The upload paths of [`StorageDriver::put_absent`].
impl S3Driver {
    /// One PutObject holding the whole payload.
    async fn put_whole(&self, bucket: &str, key: &str, payload: Bytes) -> Result<(), DriverError> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_length(payload.len() as i64)
            .body(ByteStream::from(payload))
            .send()
            .await
            .map_err(|e| classify("PutObject", bucket, key, e))?;
        Ok(())
    }

    /// A multipart upload: CreateMultipartUpload, UploadPart for slices of `payload` (no
    /// copies), [`PartUploads::concurrency`] at a time, then CompleteMultipartUpload with
    /// `If-None-Match: *`, so that the object appears whole, and only if no other writer
    /// created it meanwhile (`PreconditionFailed`: the same content is there, success).
    ///
    /// A server that refuses to start a multipart upload (it answers CreateMultipartUpload
    /// with an error: `s3s-fs` for keys whose metadata file name would pass 255 bytes, servers
    /// without multipart support) gets one PutObject instead; that call is not retried, so the
    /// fallback costs one small round trip. A failure after the upload started aborts it
    /// (AbortMultipartUpload, also when the caller drops this future), so no parts are left.
    async fn put_in_parts(
        &self,
        bucket: &str,
        key: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let no_retries =
            aws_sdk_s3::config::Builder::default().retry_config(RetryConfig::disabled());
        let request = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .customize()
            .config_override(no_retries);
        // CreateMultipartUpload runs in a task of its own, and hands over the upload as an
        // `AbortOnDrop`: when this future is dropped while the request is out, the upload it
        // starts is aborted all the same (dropped with the unread channel or by `send`).
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (client, owned_bucket, owned_key) =
            (self.client.clone(), bucket.to_owned(), key.to_owned());
        tokio::spawn(async move {
            let created = request.send().await.map(|out| AbortOnDrop {
                client,
                bucket: owned_bucket,
                key: owned_key,
                upload_id: out.upload_id,
            });
            let _ = tx.send(created);
        });
        let created = rx.await.map_err(|_| {
            DriverError::Unavailable(format!(
                "CreateMultipartUpload s3://{bucket}/{key}: the request's task ended"
            ))
        })?;
        let mut guard = match created {
            Ok(guard) => guard,
            Err(SdkError::ServiceError(e)) => {
                tracing::debug!(
                    bucket,
                    key,
                    error = %format!("{}: {}", e.err().code().unwrap_or("error"), e.err().message().unwrap_or("")),
                    "the server refused a multipart upload; sending one PutObject"
                );
                return self.put_whole(bucket, key, payload).await;
            }
            Err(e) => return Err(classify("CreateMultipartUpload", bucket, key, e)),
        };
        let Some(upload_id) = guard.upload_id.clone() else {
            return Err(DriverError::Unavailable(format!(
                "CreateMultipartUpload s3://{bucket}/{key}: no upload id in the answer"
            )));
        };
        match self.upload_parts(bucket, key, &upload_id, payload).await {
            Ok(Completion::Done) => {
                guard.upload_id = None;
                Ok(())
            }
            // The object is there: stored. The parts of this upload are not wanted.
            Ok(Completion::AlreadyThere) => {
                if let Err(e) = guard.abort().await {
                    tracing::warn!(error = %e, "a multipart upload that lost the race to the same object was not aborted");
                }
                Ok(())
            }
            Err(e) => match guard.abort().await {
                Ok(()) => Err(e),
                Err(abort) => Err(DriverError::Unavailable(format!("{e}; {abort}"))),
            },
        }
    }

    /// The parts and the completion of upload `upload_id`.
    async fn upload_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        payload: Bytes,
    ) -> Result<Completion, DriverError> {
        use futures::{StreamExt, TryStreamExt};
        let len = payload.len() as u64;
        let part_size = self.parts.part_size_for(len) as usize;
        let count = payload.len().div_ceil(part_size);
        let uploads = (0..count).map(|i| {
            let body = payload.slice(i * part_size..((i + 1) * part_size).min(payload.len()));
            let number = i as i32 + 1;
            async move {
                let out = self
                    .client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(body.len() as i64)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| {
                        classify(&format!("UploadPart {number}/{count}"), bucket, key, e)
                    })?;
                Ok::<_, DriverError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag)
                        .build(),
                )
            }
        });
        let mut parts: Vec<CompletedPart> = futures::stream::iter(uploads)
            .buffer_unordered(self.parts.concurrency.max(1))
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number);
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .if_none_match("*")
            .send()
            .await;
        match completed {
            Ok(_) => Ok(Completion::Done),
            // Another writer created the same content-addressed object first: success, and
            // this upload, not completed, is aborted by the caller.
            Err(SdkError::ServiceError(e)) if e.err().code() == Some("PreconditionFailed") => {
                Ok(Completion::AlreadyThere)
            }
            Err(e) => Err(classify("CompleteMultipartUpload", bucket, key, e)),
        }
    }
}

/// How a multipart upload's completion went.
enum Completion {
    /// The object is stored.
    Done,
    /// The object was created by another writer first (`PreconditionFailed`); this upload
    /// is still open.
    AlreadyThere,
}

/// Aborts an open multipart upload: explicitly through [`abort`](Self::abort), or, when the
/// upload future is dropped before it finished (a cancelled request), from a spawned task.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    key: String,
    /// `None` once completed or aborted.
    upload_id: Option<String>,
}

impl AbortOnDrop {
    /// AbortMultipartUpload; the error names the upload that is left.
    async fn abort(&mut self) -> Result<(), DriverError> {
        let Some(upload_id) = self.upload_id.take() else {
            return Ok(());
        };
        abort_upload(&self.client, &self.bucket, &self.key, &upload_id).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(bucket = %self.bucket, key = %self.key, upload_id, "a cancelled multipart upload is left open (no runtime to abort it)");
            return;
        };
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
        runtime.spawn(async move {
            if let Err(e) = abort_upload(&client, &bucket, &key, &upload_id).await {
                tracing::warn!(error = %e, "a cancelled multipart upload was not aborted");
            }
        });
    }
}

/// AbortMultipartUpload of `upload_id`.
async fn abort_upload(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), DriverError> {
    client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
        .map(drop)
        .map_err(|e| {
            let mut err = classify("AbortMultipartUpload", bucket, key, e);
            if let DriverError::Unavailable(detail) = &mut err {
                detail.push_str(&format!(" (upload {upload_id} is left)"));
            }
            err
        })
}

#[async_trait]
impl StorageDriver for S3Driver {
    fn settings(&self) -> &DriverSettings {
        &self.settings
    }

    /// HeadObject, then, only when the object is absent, PutObject or (from
    /// [`PartUploads::threshold`] bytes) a multipart upload completed with `If-None-Match: *`.
    async fn put_absent(
        &self,
        bucket: Option<&str>,
        key: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let bucket = bucket.unwrap_or_default();
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => {}
            Err(e) => return Err(classify("HeadObject", bucket, key, e)),
        }
        if self.parts.applies_to(payload.len() as u64) {
            return self.put_in_parts(bucket, key, payload).await;
        }
        self.put_whole(bucket, key, payload).await
    }

    /// GetObject; the response's `Content-Length` is checked before the body is read (an
    /// object refused there is dropped unread, closing the connection), and each chunk of
    /// the body is hashed as it arrives.
    async fn get(&self, claim: &ValidClaim, limit: ReadLimit) -> Result<Verified, DriverError> {
        let bucket = claim.bucket.as_deref().unwrap_or_default();
        let key = &claim.key;
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| match e {
                SdkError::ServiceError(se) if se.err().is_no_such_key() => {
                    DriverError::NotFound(format!("s3://{bucket}/{key}"))
                }
                e => classify("GetObject", bucket, key, e),
            })?;
        let announced = out.content_length.map_or(0, |len| len.max(0) as u64);
        limit.check(announced)?;
        let mut body = BoundedBody::new(claim, limit, announced);
        let mut stream = out.body;
        while let Some(chunk) = stream.try_next().await.map_err(|e| {
            DriverError::Unavailable(format!(
                "GetObject s3://{bucket}/{key}: reading the body: {e}"
            ))
        })? {
            body.push(chunk)?;
        }
        body.finish()
    }

    /// ListObjectsV2, page by page.
    async fn list(
        &self,
        bucket: Option<&str>,
        prefix: &str,
    ) -> Result<Vec<ListedObject>, DriverError> {
        let bucket = bucket.unwrap_or_default();
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ListObjectsV2", bucket, prefix, e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let last_modified = object
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .ok_or_else(|| {
                        DriverError::Unavailable(format!(
                            "ListObjectsV2 s3://{bucket}/{key}: no LastModified"
                        ))
                    })?;
                out.push(ListedObject {
                    bucket: Some(bucket.to_owned()),
                    key: key.to_owned(),
                    size: object.size().map_or(0, |s| s.max(0) as u64),
                    last_modified,
                });
            }
        }
        Ok(out)
    }

    /// DeleteObject (S3 answers success for a key that is not there).
    async fn delete(&self, bucket: Option<&str>, key: &str) -> Result<(), DriverError> {
        let bucket = bucket.unwrap_or_default();
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify("DeleteObject", bucket, key, e))?;
        Ok(())
    }
}
