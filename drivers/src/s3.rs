//! `aws.s3driver`-compatible storage on Amazon S3 or an S3-compatible server, via `aws-sdk-s3`.
//!
//! Wire-compatible with `temporalio.contrib.aws.s3driver`: same key layout, same claim
//! (`bucket`, `key`, `hash_algorithm`, `hash_value`), HeadObject then PutObject only when the
//! object is absent, SHA-256 verified on every GetObject.
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
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
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
        }
    }
}

/// Stores payloads in S3.
#[derive(Debug)]
pub struct S3Driver {
    client: Client,
    settings: DriverSettings,
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

#[async_trait]
impl StorageDriver for S3Driver {
    fn settings(&self) -> &DriverSettings {
        &self.settings
    }

    /// HeadObject, then PutObject only when the object is absent.
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
