//! AWS KMS as a key-encryption key: `awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID`.
//!
//! - **Credentials and endpoint** come from the AWS SDK's standard chain (`aws-config`):
//!   environment, shared profile files, web identity (IRSA), container and instance metadata;
//!   `AWS_ENDPOINT_URL_KMS` or `AWS_ENDPOINT_URL` point the client at a KMS-compatible server.
//! - **Region** is the ARN's, whatever the environment says, so a key is always asked for in
//!   the region that holds it (a `?region=` suffix, as temporal-proxy writes it, must agree).
//! - **Namespace binding**: `Encrypt` and `Decrypt` carry the encryption context
//!   `{"temporal-namespace": <namespace>}` (none for requests without a namespace), which KMS
//!   authenticates: a wrapped data key does not decrypt under another namespace's context.
//! - **Timeout**: every call, retries included, is bounded by `encryption.kms_timeout_ms`; a
//!   hung or unreachable KMS is [`KmsError::Unavailable`].
//! - The client is built on first use (loading credentials needs the async runtime), so
//!   configuration loads and reloads stay synchronous and never wait for the network.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use tokio::sync::OnceCell;
use zeroize::Zeroize;

use super::{Dek, KeyEncryptionKey, KmsError, Provider};

/// URI scheme of AWS KMS keys.
pub const SCHEME: &str = "awskms";

/// Encryption-context key that carries the namespace.
pub const NAMESPACE_CONTEXT_KEY: &str = "temporal-namespace";

/// A key in AWS KMS.
pub struct AwsKmsKey {
    key_id: String,
    arn: String,
    region: String,
    timeout: Duration,
    client: OnceCell<Client>,
}

impl fmt::Debug for AwsKmsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKey")
            .field("key_id", &self.key_id)
            .field("arn", &self.arn)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AwsKmsKey {
    /// Parses `uri` (`awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID`, or `alias/NAME`, with an
    /// optional `?region=REGION` that must match the ARN's) for the configured `key_id`.
    pub fn new(key_id: &str, uri: &str, timeout: Duration) -> Result<Self, KmsError> {
        let config = |reason: String| KmsError::Config {
            key_id: key_id.to_owned(),
            reason,
        };
        let rest = uri.strip_prefix("awskms:///").ok_or_else(|| {
            config(format!(
                "{uri:?} is not of the form awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID"
            ))
        })?;
        let (arn, query) = match rest.split_once('?') {
            Some((arn, query)) => (arn, Some(query)),
            None => (rest, None),
        };
        let (region, resource) = parse_arn(arn).map_err(config)?;
        if let Some(query) = query {
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("region", r)) if r == region => {}
                    Some(("region", r)) => {
                        return Err(config(format!(
                            "?region={r} disagrees with the ARN's region {region}"
                        )));
                    }
                    _ => return Err(config(format!("unsupported URI parameter {pair:?}"))),
                }
            }
        }
        if !(resource.starts_with("key/") || resource.starts_with("alias/")) {
            return Err(config(format!(
                "the ARN names {resource:?}; expected key/ID or alias/NAME"
            )));
        }
        Ok(Self {
            key_id: key_id.to_owned(),
            arn: arn.to_owned(),
            region: region.to_owned(),
            timeout,
            client: OnceCell::new(),
        })
    }

    /// The key's ARN.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(self.timeout.min(Duration::from_secs(5)))
                            .operation_timeout(self.timeout)
                            .build(),
                    )
                    .load()
                    .await;
                Client::new(&shared)
            })
            .await
    }

    fn context(namespace: &str) -> Option<HashMap<String, String>> {
        (!namespace.is_empty())
            .then(|| HashMap::from([(NAMESPACE_CONTEXT_KEY.to_owned(), namespace.to_owned())]))
    }

    /// Maps an SDK error to a [`KmsError`] (no key material is ever in these messages).
    fn error<E, R>(&self, e: SdkError<E, R>) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug,
    {
        let key_id = self.key_id.clone();
        let provider = Provider::AwsKms.label();
        match &e {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("unknown").to_owned();
                let reason = format!(
                    "{code}: {}",
                    service.err().message().unwrap_or("no message")
                );
                match code.as_str() {
                    "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::Invalid {
                        key_id,
                        provider,
                        reason,
                    },
                    "DependencyTimeoutException"
                    | "KMSInternalException"
                    | "KeyUnavailableException"
                    | "ThrottlingException"
                    | "LimitExceededException"
                    | "ServiceUnavailableException"
                    | "InternalFailure" => KmsError::Unavailable {
                        key_id,
                        provider,
                        reason,
                    },
                    _ => KmsError::Refused {
                        key_id,
                        provider,
                        reason,
                    },
                }
            }
            SdkError::ConstructionFailure(_) => KmsError::Config {
                key_id,
                reason: DisplayErrorContext(&e).to_string(),
            },
            _ => KmsError::Unavailable {
                key_id,
                provider,
                reason: DisplayErrorContext(&e).to_string(),
            },
        }
    }

    fn timed_out(&self) -> KmsError {
        KmsError::Unavailable {
            key_id: self.key_id.clone(),
            provider: Provider::AwsKms.label(),
            reason: format!("no answer within {} ms", self.timeout.as_millis()),
        }
    }
}

/// `arn:aws:kms:REGION:ACCOUNT:RESOURCE` (any AWS partition) → (region, resource).
fn parse_arn(arn: &str) -> Result<(&str, &str), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    match parts.as_slice() {
        ["arn", partition, "kms", region, account, resource]
            if partition.starts_with("aws")
                && !region.is_empty()
                && !account.is_empty()
                && !resource.is_empty() =>
        {
            Ok((region, resource))
        }
        _ => Err(format!(
            "{arn:?} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
        )),
    }
}

#[async_trait::async_trait]
impl KeyEncryptionKey for AwsKmsKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn provider(&self) -> Provider {
        Provider::AwsKms
    }

    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError> {
        let call = async {
            self.client()
                .await
                .encrypt()
                .key_id(&self.arn)
                .plaintext(Blob::new(dek.expose().to_vec()))
                .set_encryption_context(Self::context(namespace))
                .send()
                .await
                .map_err(|e| self.error(e))
        };
        let out = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| self.timed_out())??;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .filter(|b| !b.is_empty())
            .ok_or_else(|| KmsError::Invalid {
                key_id: self.key_id.clone(),
                provider: Provider::AwsKms.label(),
                reason: "Encrypt returned no ciphertext".to_owned(),
            })
    }

    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError> {
        let call = async {
            self.client()
                .await
                .decrypt()
                .key_id(&self.arn)
                .ciphertext_blob(Blob::new(wrapped.to_vec()))
                .set_encryption_context(Self::context(namespace))
                .send()
                .await
                .map_err(|e| self.error(e))
        };
        let out = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| self.timed_out())??;
        let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
        let dek = Dek::from_slice(&plain);
        plain.zeroize();
        dek.ok_or_else(|| KmsError::Invalid {
            key_id: self.key_id.clone(),
            provider: Provider::AwsKms.label(),
            reason: "Decrypt returned no 32-byte data key".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn parses_key_and_alias_arns_and_takes_their_region() {
        let key = AwsKmsKey::new("k", &format!("awskms:///{ARN}"), Duration::from_secs(1)).unwrap();
        assert_eq!(key.arn(), ARN);
        assert_eq!(key.region, "eu-west-1");
        let alias = "awskms:///arn:aws:kms:us-east-2:111122223333:alias/payments";
        assert_eq!(
            AwsKmsKey::new("k", alias, Duration::from_secs(1))
                .unwrap()
                .region,
            "us-east-2"
        );
        let with_region = format!("awskms:///{ARN}?region=eu-west-1");
        assert!(AwsKmsKey::new("k", &with_region, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn refuses_malformed_uris_naming_the_key() {
        for bad in [
            format!("awskms://{ARN}"),
            "awskms:///arn:aws:s3:::bucket/key".to_owned(),
            "awskms:///arn:aws:kms::111122223333:key/x".to_owned(),
            "awskms:///arn:aws:kms:eu-west-1:111122223333:grant/x".to_owned(),
            format!("awskms:///{ARN}?region=us-east-1"),
            format!("awskms:///{ARN}?profile=x"),
        ] {
            let err = AwsKmsKey::new("payments", &bad, Duration::from_secs(1)).unwrap_err();
            assert!(
                matches!(&err, KmsError::Config { key_id, .. } if key_id == "payments"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn namespace_is_the_encryption_context() {
        assert_eq!(AwsKmsKey::context(""), None);
        assert_eq!(
            AwsKmsKey::context("payments").unwrap()[NAMESPACE_CONTEXT_KEY],
            "payments"
        );
    }
}
