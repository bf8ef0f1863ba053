//! External storage of large payloads: builds the configured drivers, offloads payloads at or
//! above the threshold (after the codec, so objects hold ciphertext) and resolves references
//! on the way back (before the codec), with a byte-bounded LRU cache of verified objects.

pub mod cache;
pub mod reference;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use payload_gateway_drivers::azure::{AzureConfig, AzureDriver};
use payload_gateway_drivers::filesystem::FilesystemDriver;
use payload_gateway_drivers::gcs::{GcsConfig, GcsDriver};
use payload_gateway_drivers::object::ObjectStoreDriver;
use payload_gateway_drivers::s3::{self, S3Config, S3Driver};
use payload_gateway_drivers::{ClaimData, DriverError, Fetch, StorageDriver, StoreContext, layout};

use crate::budget::MessageBudget;
use crate::config::{Config, ConfigError, DriverConfig, DriverKind};
use crate::metrics::{CacheLabels, StorageLabels, metrics};
use crate::policy::ByNamespace;
use cache::ByteCache;
pub use reference::{Kind, Reference};

/// A driver's settings, validated at config load.
#[derive(Debug, Clone)]
pub enum DriverSpec {
    /// `kind = "s3"`.
    S3(S3Config),
    /// `kind = "gcs"`.
    Gcs(GcsConfig),
    /// `kind = "azure"`.
    Azure(AzureConfig),
    /// `kind = "filesystem"`.
    Filesystem {
        /// Driver name.
        name: String,
        /// Root directory.
        root: PathBuf,
        /// Largest payload stored.
        max_payload_size: u64,
    },
    /// `kind = "memory"`.
    Memory {
        /// Driver name.
        name: String,
        /// Largest payload stored.
        max_payload_size: u64,
    },
}

struct Settings<'a> {
    key: String,
    map: &'a BTreeMap<String, toml::Value>,
    used: Vec<&'static str>,
}

impl<'a> Settings<'a> {
    fn err(&self, name: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::invalid(format!("{}.{name}", self.key), problem)
    }

    fn string(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(self.err(name, "must be a non-empty string")),
        }
    }

    fn bool(&mut self, name: &'static str) -> Result<Option<bool>, ConfigError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(name, "must be true or false")),
        }
    }

    fn positive(&mut self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i > 0 => Ok(Some(*i as u64)),
            Some(_) => Err(self.err(name, "must be a positive integer")),
        }
    }

    fn strings(&mut self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(self.err(name, "must be a list of non-empty strings")),
                })
                .collect(),
            Some(_) => Err(self.err(name, "must be a list of strings")),
        }
    }

    fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(unknown) => Err(self.err(unknown, "unknown setting for this driver kind")),
            None => Ok(()),
        }
    }
}

impl DriverSpec {
    /// Validates `storage.drivers[index]`.
    pub fn parse(index: usize, d: &DriverConfig) -> Result<Self, ConfigError> {
        let key = format!("storage.drivers[{index}]");
        if d.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                "must not be empty",
            ));
        }
        let mut s = Settings {
            key: key.clone(),
            map: &d.settings,
            used: Vec::new(),
        };
        let max = s
            .positive("max_payload_size")?
            .unwrap_or(layout::DEFAULT_MAX_PAYLOAD_SIZE);
        let spec = match d.kind {
            DriverKind::S3 => {
                let bucket = s
                    .string("bucket")?
                    .ok_or_else(|| s.err("bucket", "required for kind = \"s3\""))?;
                let mut c = S3Config::new(bucket);
                c.name = d.name.clone();
                c.read_buckets = s.strings("read_buckets")?;
                c.region = s.string("region")?;
                c.endpoint = s.string("endpoint")?;
                c.force_path_style = s.bool("force_path_style")?.unwrap_or(false);
                c.max_payload_size = max;
                if let Some(ms) = s.positive("timeout_ms")? {
                    c.operation_timeout = Duration::from_millis(ms);
                }
                if let Some(threshold) = s.positive("part_upload_threshold")? {
                    c.parts.threshold = threshold;
                }
                if let Some(size) = s.positive("part_size")? {
                    if size < s3::MIN_PART_SIZE {
                        return Err(s.err(
                            "part_size",
                            format!(
                                "must be at least {} (S3's smallest part)",
                                s3::MIN_PART_SIZE
                            ),
                        ));
                    }
                    c.parts.part_size = size;
                }
                if let Some(n) = s.positive("part_concurrency")? {
                    c.parts.concurrency = usize::try_from(n).unwrap_or(usize::MAX);
                }
                DriverSpec::S3(c)
            }
            DriverKind::Filesystem => DriverSpec::Filesystem {
                name: d.name.clone(),
                root: PathBuf::from(
                    s.string("root")?
                        .ok_or_else(|| s.err("root", "required for kind = \"filesystem\""))?,
                ),
                max_payload_size: max,
            },
            DriverKind::Memory => DriverSpec::Memory {
                name: d.name.clone(),
                max_payload_size: max,
            },
            DriverKind::Gcs => {
                let bucket = s
                    .string("bucket")?
                    .ok_or_else(|| s.err("bucket", "required for kind = \"gcs\""))?;
                let mut c = GcsConfig::new(bucket);
                c.name = d.name.clone();
                c.read_buckets = s.strings("read_buckets")?;
                c.endpoint = s.string("endpoint")?;
                c.anonymous = s.bool("anonymous")?.unwrap_or(false);
                c.service_account_path = s.string("service_account_path")?.map(PathBuf::from);
                c.max_payload_size = max;
                if let Some(ms) = s.positive("timeout_ms")? {
                    c.operation_timeout = Duration::from_millis(ms);
                }
                DriverSpec::Gcs(c)
            }
            DriverKind::Azure => {
                let account = s
                    .string("account")?
                    .ok_or_else(|| s.err("account", "required for kind = \"azure\""))?;
                let container = s
                    .string("container")?
                    .ok_or_else(|| s.err("container", "required for kind = \"azure\""))?;
                let mut c = AzureConfig::new(account, container);
                c.name = d.name.clone();
                c.read_containers = s.strings("read_containers")?;
                c.endpoint = s.string("endpoint")?;
                c.anonymous = s.bool("anonymous")?.unwrap_or(false);
                c.max_payload_size = max;
                if let Some(ms) = s.positive("timeout_ms")? {
                    c.operation_timeout = Duration::from_millis(ms);
                }
                DriverSpec::Azure(c)
            }
        };
        s.finish()?;
        Ok(spec)
    }

    async fn build(self, concurrency: usize) -> Result<Arc<dyn StorageDriver>, DriverError> {
        Ok(match self {
            DriverSpec::S3(mut c) => {
                c.concurrency = concurrency;
                Arc::new(S3Driver::new(c).await)
            }
            DriverSpec::Gcs(mut c) => {
                c.concurrency = concurrency;
                Arc::new(GcsDriver::new(c)?)
            }
            DriverSpec::Azure(mut c) => {
                c.concurrency = concurrency;
                Arc::new(AzureDriver::new(c)?)
            }
            DriverSpec::Filesystem {
                name,
                root,
                max_payload_size,
            } => Arc::new(FilesystemDriver::new(name, &root, max_payload_size)?),
            DriverSpec::Memory {
                name,
                max_payload_size,
            } => Arc::new(ObjectStoreDriver::memory(name, max_payload_size)),
        })
    }
}

/// Where and whether one namespace offloads.
#[derive(Debug, Clone)]
struct Policy {
    driver: Option<Arc<dyn StorageDriver>>,
    threshold: usize,
    /// Other namespaces whose objects this namespace may resolve (Nexus): each name with its
    /// key segment in the S3 encoding and in the GCS encoding.
    read_namespaces: Vec<([String; 2], String)>,
}

/// A storage failure for the payload at `index`.
#[derive(Debug)]
pub struct StorageError {
    /// Index in the batch.
    pub index: usize,
    /// What kind of failure (the edges map it to a gRPC or HTTP status).
    pub kind: StorageFailure,
    /// Description (never payload contents).
    pub reason: String,
}

/// Why storage failed, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    /// The store could not be reached or did not answer in time (retrying may succeed).
    Unavailable,
    /// The payload is larger than the driver stores.
    TooLarge,
    /// The reference's claim may not be read by this namespace.
    Refused,
    /// The stored object is missing, or is not what its reference says.
    Lost,
    /// Resolving would pass the message's or the process's memory budget.
    Budget,
    /// The driver broke its contract (a bug).
    Internal,
}

impl StorageError {
    fn driver(index: usize, driver: &str, e: DriverError) -> Self {
        let kind = match &e {
            DriverError::Unavailable(_) => StorageFailure::Unavailable,
            DriverError::TooLarge { .. } => StorageFailure::TooLarge,
            DriverError::ClaimRefused(_) => StorageFailure::Refused,
            DriverError::NotFound(_)
            | DriverError::Integrity(_)
            | DriverError::LargerThanDeclared { .. } => StorageFailure::Lost,
        };
        let hint = match &e {
            DriverError::TooLarge { .. } => {
                " (raise max_payload_size of the storage driver to allow it)"
            }
            _ => "",
        };
        Self {
            index,
            kind,
            reason: format!("storage driver {driver:?}: {e}{hint}"),
        }
    }
}

/// Checks `storage.drivers[index]`'s kind-specific settings (what [`DriverSpec::parse`]
/// checks), whether or not offload is enabled: the [`crate::config::DriverCheck`] that
/// [`crate::app::load_config`] hands to [`Config::load_checked`], so that config does not
/// depend on storage and the errors come in the same order as before.
pub fn check_driver(index: usize, d: &DriverConfig) -> Result<(), ConfigError> {
    DriverSpec::parse(index, d).map(drop)
}

/// The configured drivers and per-namespace offload policy.
#[derive(Debug)]
pub struct Storage {
    drivers: HashMap<String, Arc<dyn StorageDriver>>,
    /// Per namespace (resolved by [`crate::policy`]).
    policies: ByNamespace<Policy>,
    cache: ByteCache,
    concurrency: usize,
}

impl Storage {
    /// Builds the drivers when offload is enabled globally or for any namespace; `None`
    /// otherwise.
    pub async fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let sc = &config.storage;
        let any = sc.enabled || config.namespaces.values().any(|n| n.storage == Some(true));
        if !any {
            return Ok(None);
        }
        let mut drivers = HashMap::new();
        for (i, d) in sc.drivers.iter().enumerate() {
            let built = DriverSpec::parse(i, d)?
                .build(sc.concurrency)
                .await
                .map_err(|e| {
                    ConfigError::invalid(format!("storage.drivers[{i}]"), e.to_string())
                })?;
            drivers.insert(d.name.clone(), built);
        }
        let policies = crate::policy::resolve(config).try_map(|_, p| {
            Ok::<_, ConfigError>(Policy {
                driver: if p.storage {
                    drivers.get(&p.storage_driver).cloned()
                } else {
                    None
                },
                threshold: p.storage_threshold,
                read_namespaces: p
                    .storage_read_namespaces
                    .iter()
                    .filter_map(|ns| {
                        let strict = layout::Encoding::Strict.encode(Some(ns))?;
                        let gcs = layout::Encoding::Gcs.encode(Some(ns))?;
                        Some(([strict, gcs], ns.clone()))
                    })
                    .collect(),
            })
        })?;
        Ok(Some(Self {
            drivers,
            policies,
            cache: ByteCache::new(sc.cache_bytes),
            concurrency: sc.concurrency.max(1),
        }))
    }

    /// A storage over the given drivers (tests, benches): `driver` stores everything at or
    /// above `threshold`.
    pub fn with_drivers(
        drivers: Vec<Arc<dyn StorageDriver>>,
        driver: &str,
        threshold: usize,
        cache_bytes: usize,
    ) -> Self {
        let drivers: HashMap<_, _> = drivers
            .into_iter()
            .map(|d| (d.name().to_owned(), d))
            .collect();
        Self {
            policies: ByNamespace::only_default(Policy {
                driver: drivers.get(driver).cloned(),
                threshold,
                read_namespaces: Vec::new(),
            }),
            drivers,
            cache: ByteCache::new(cache_bytes),
            concurrency: 16,
        }
    }

    fn policy(&self, namespace: Option<&str>) -> &Policy {
        self.policies.get(namespace)
    }

    /// Probes every driver (a listing of a prefix nothing is under, bounded by `timeout`),
    /// by driver name: `Err` says why a store does not answer (readiness).
    pub async fn check_drivers(&self, timeout: Duration) -> Vec<(String, Result<(), String>)> {
        let mut names: Vec<&String> = self.drivers.keys().collect();
        names.sort();
        let checks = names.into_iter().map(|name| async move {
            let driver = &self.drivers[name];
            let state = match tokio::time::timeout(timeout, driver.probe()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            (name.clone(), state)
        });
        futures::future::join_all(checks).await
    }

    /// The configured drivers, by name (garbage collection).
    pub fn drivers(&self) -> &HashMap<String, Arc<dyn StorageDriver>> {
        &self.drivers
    }

    /// Whether `namespace` offloads new payloads.
    pub fn is_active(&self, namespace: Option<&str>) -> bool {
        self.policy(namespace).driver.is_some()
    }

    /// The size at or above which `namespace` offloads a payload, `None` where it does not
    /// offload.
    pub fn threshold(&self, namespace: Option<&str>) -> Option<usize> {
        let policy = self.policy(namespace);
        policy.driver.as_ref().map(|_| policy.threshold)
    }

    /// The largest payload `namespace` can offload (its driver's `max_payload_size`), `None`
    /// where it does not offload.
    pub fn max_offload_size(&self, namespace: Option<&str>) -> Option<u64> {
        let driver = self.policy(namespace).driver.as_ref()?;
        Some(driver.settings().max_payload_size)
    }

    /// Offloads each of `payloads` (already codec-encoded) at or above the namespace's
    /// threshold; returns the reference payload for those, `None` for the rest.
    pub async fn offload(
        &self,
        context: &StoreContext,
        payloads: &[Bytes],
    ) -> Result<Vec<Option<Bytes>>, StorageError> {
        let Some(threshold) = self.threshold(context.namespace.as_deref()) else {
            return Ok(vec![None; payloads.len()]);
        };
        let chosen: Vec<usize> = (0..payloads.len())
            .filter(|&i| payloads[i].len() >= threshold)
            .collect();
        self.offload_chosen(context, payloads, &chosen).await
    }

    /// Offloads the `chosen` ones of `payloads` (already codec-encoded), whatever their
    /// size; returns the reference payload for those, `None` for the rest.
    pub async fn offload_chosen(
        &self,
        context: &StoreContext,
        payloads: &[Bytes],
        chosen: &[usize],
    ) -> Result<Vec<Option<Bytes>>, StorageError> {
        let policy = self.policy(context.namespace.as_deref());
        let mut out = vec![None; payloads.len()];
        let Some(driver) = &policy.driver else {
            return Ok(out);
        };
        if chosen.is_empty() {
            return Ok(out);
        }
        let batch = chosen.iter().map(|&i| payloads[i].clone()).collect();
        let claims = observed(driver.name(), "store", driver.store(context, batch))
            .await
            .map_err(|e| StorageError::driver(chosen[0], driver.name(), e))?;
        metrics().count_payloads(context.namespace.as_deref(), "offloaded", chosen.len());
        for (&i, claim) in chosen.iter().zip(claims) {
            tracing::debug!(
                driver = driver.name(),
                size = payloads[i].len(),
                "offloaded payload"
            );
            out[i] = Some(reference::build(driver.name(), &claim, payloads[i].len()));
        }
        Ok(out)
    }

    /// Resolves `refs` (index in the batch, reference) for a request in `namespace`, with
    /// bounded concurrency. References naming a driver that is not configured are left as
    /// they are (`None`): an SDK with its own driver may resolve them.
    ///
    /// Memory: the sizes the references declare are charged to `budget` before anything is
    /// fetched (a fan-out of references to large objects is refused up front); an object
    /// larger than its reference declares is refused (`DATA_LOSS`) from the store's metadata,
    /// before its body is read, and what was not declared is charged once fetched. The same
    /// claim is fetched once per call, bounded by the smallest size its references declare.
    pub async fn resolve(
        &self,
        namespace: Option<&str>,
        refs: Vec<(usize, Reference)>,
        budget: &MessageBudget,
    ) -> Result<Vec<(usize, Option<Bytes>)>, StorageError> {
        let declared: u64 = refs
            .iter()
            .filter(|(_, r)| self.drivers.contains_key(&r.driver_name))
            .map(|(_, r)| r.declared_size.unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        if let Some(&(first, _)) = refs.first() {
            budget
                .charge(usize::try_from(declared).unwrap_or(usize::MAX))
                .map_err(|e| StorageError {
                    index: first,
                    kind: StorageFailure::Budget,
                    reason: format!(
                        "{} storage references declaring {declared} bytes in total: {e}",
                        refs.len()
                    ),
                })?;
        }
        // One fetch per distinct claim; duplicates share the bytes.
        let mut unique: HashMap<String, usize> = HashMap::new();
        let mut order = Vec::with_capacity(refs.len());
        let mut fetch: Vec<(usize, Reference)> = Vec::new();
        for (index, r) in refs {
            let key = cache_key(&r.driver_name, &r.claim);
            let slot = *unique.entry(key).or_insert_with(|| {
                fetch.push((index, r.clone()));
                fetch.len() - 1
            });
            // The smallest size any of the claim's references declares bounds its one fetch.
            let bound = &mut fetch[slot].1.declared_size;
            *bound = match (*bound, r.declared_size) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            order.push((index, slot, r.declared_size));
        }
        let fetched: Vec<Option<Bytes>> = stream::iter(
            fetch
                .into_iter()
                .map(|(index, r)| async move { self.resolve_one(namespace, index, r).await }),
        )
        .buffered(self.concurrency)
        .try_collect()
        .await?;
        let mut out = Vec::with_capacity(order.len());
        for (index, slot, declared) in order {
            let bytes = fetched[slot].clone();
            if let Some(b) = &bytes {
                let len = b.len() as u64;
                match declared {
                    Some(d) if len > d => {
                        return Err(StorageError {
                            index,
                            kind: StorageFailure::Lost,
                            reason: format!(
                                "stored object of {len} bytes is larger than the {d} bytes \
                                 its reference declares"
                            ),
                        });
                    }
                    Some(_) => {}
                    None => budget.charge(b.len()).map_err(|e| StorageError {
                        index,
                        kind: StorageFailure::Budget,
                        reason: e.to_string(),
                    })?,
                }
            }
            out.push((index, bytes));
        }
        Ok(out)
    }

    async fn resolve_one(
        &self,
        namespace: Option<&str>,
        index: usize,
        r: Reference,
    ) -> Result<Option<Bytes>, StorageError> {
        let Some(driver) = self.drivers.get(&r.driver_name) else {
            tracing::debug!(driver = %r.driver_name, "reference to an unconfigured driver left as is");
            return Ok(None);
        };
        // Validate before the cache: a cached object is only served to a claim that may read it.
        let namespace = self.read_scope(namespace, &r.claim);
        driver
            .validate(namespace, &r.claim)
            .map_err(|e| StorageError::driver(index, driver.name(), e))?;
        let cache_key = cache_key(&r.driver_name, &r.claim);
        let hit = self.cache.get(&cache_key);
        metrics()
            .cache_lookups
            .get_or_create(&CacheLabels {
                result: if hit.is_some() { "hit" } else { "miss" },
            })
            .inc();
        metrics().count_payloads(namespace, "resolved", 1);
        if let Some(hit) = hit {
            return Ok(Some(hit));
        }
        let mut got = observed(
            driver.name(),
            "retrieve",
            driver.retrieve(
                namespace,
                vec![Fetch {
                    claim: r.claim,
                    declared_size: r.declared_size,
                }],
            ),
        )
        .await
        .map_err(|e| StorageError::driver(index, driver.name(), e))?;
        let bytes = got.pop().ok_or_else(|| StorageError {
            index,
            kind: StorageFailure::Internal,
            reason: format!("storage driver {:?} returned no payload", driver.name()),
        })?;
        self.cache.insert(cache_key, bytes.clone());
        Ok(Some(bytes))
    }
}

impl Storage {
    /// Whether `r` names a configured driver and carries a claim that driver accepts for a
    /// request in `namespace`: the only references the encode direction forwards untouched.
    pub fn accepts_reference(&self, namespace: Option<&str>, r: &Reference) -> bool {
        let Some(driver) = self.drivers.get(&r.driver_name) else {
            return false;
        };
        driver
            .validate(self.read_scope(namespace, &r.claim), &r.claim)
            .is_ok()
    }

    /// The namespace whose key prefix `claim` is checked against: the requesting namespace,
    /// or the namespace the claim's key names when the requesting namespace may read it
    /// (`[namespaces.<ns>] storage_read_namespaces`).
    fn read_scope<'a>(&'a self, namespace: Option<&'a str>, claim: &ClaimData) -> Option<&'a str> {
        let key_namespace = [
            layout::CLAIM_KEY,
            layout::CLAIM_OBJECT_NAME,
            layout::CLAIM_BLOB_NAME,
        ]
        .iter()
        .find_map(|field| claim.get(*field))
        .and_then(|key| key.strip_prefix("v0/ns/"))
        .and_then(|rest| rest.split('/').next());
        let Some(key_namespace) = key_namespace else {
            return namespace;
        };
        self.policy(namespace)
            .read_namespaces
            .iter()
            .find(|(encoded, _)| encoded.iter().any(|e| e == key_namespace))
            .map_or(namespace, |(_, name)| Some(name.as_str()))
    }
}

/// Runs a driver operation, recording its latency and, on failure, an error.
async fn observed<T>(
    driver: &str,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, DriverError>>,
) -> Result<T, DriverError> {
    let started = std::time::Instant::now();
    let result = call.await;
    let labels = StorageLabels {
        driver: driver.to_owned(),
        operation,
    };
    metrics()
        .storage_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics().storage_errors.get_or_create(&labels).inc();
    }
    result
}

fn cache_key(driver: &str, claim: &ClaimData) -> String {
    let mut key = String::from(driver);
    for (k, v) in claim {
        key.push('\0');
        key.push_str(k);
        key.push('\0');
        key.push_str(v);
    }
    key
}

#[cfg(test)]
mod read_scope_tests {
    use super::*;
    use crate::config::Config;

    fn storage(extra: &str) -> Storage {
        let config = Config::from_toml(
            &format!(
                "[encryption]\nenabled = false\n[storage]\nenabled = true\ndriver = \"local\"\n\
                 [[storage.drivers]]\nname = \"local\"\nkind = \"memory\"\n{extra}\n"
            ),
            Vec::new(),
        )
        .unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(Storage::from_config(&config))
            .unwrap()
            .unwrap()
    }

    fn claim(key: &str) -> ClaimData {
        ClaimData::from([("key".to_owned(), key.to_owned())])
    }

    #[test]
    fn a_namespace_reads_only_its_own_prefix_unless_granted() {
        let s = storage("[namespaces.b]\nstorage_read_namespaces = [\"a\", \"ops team\"]\n");
        let a_key = claim("v0/ns/a/d/sha256/00");
        // b may read a; c may not (it gets its own namespace back, which the driver refuses).
        assert_eq!(s.read_scope(Some("b"), &a_key), Some("a"));
        assert_eq!(s.read_scope(Some("c"), &a_key), Some("c"));
        assert_eq!(
            s.read_scope(Some("a"), &claim("v0/ns/b/d/sha256/00")),
            Some("a")
        );
        // Names are compared in their percent-encoded key form.
        assert_eq!(
            s.read_scope(Some("b"), &claim("v0/ns/ops%20team/d/sha256/00")),
            Some("ops team")
        );
        assert_eq!(s.read_scope(Some("b"), &claim("v0/d/sha256/00")), Some("b"));
        // `gcp.gcsdriver` keeps readable names (`object_name`); Azure's claim has `blob_name`.
        let gcs = ClaimData::from([(
            "object_name".to_owned(),
            "v0/ns/ops team/d/sha256/00".to_owned(),
        )]);
        assert_eq!(s.read_scope(Some("b"), &gcs), Some("ops team"));
        assert_eq!(s.read_scope(Some("c"), &gcs), Some("c"));
        let azure = ClaimData::from([("blob_name".to_owned(), "v0/ns/a/d/sha256/00".to_owned())]);
        assert_eq!(s.read_scope(Some("b"), &azure), Some("a"));
    }

    /// References an SDK wrote without a target (`create_schedule`, completion by task token)
    /// have the key `v0/d/sha256/{hash}`: no namespace to scope by. They are content-addressed
    /// and hash-verified, and resolved for any namespace that presents them (README, "External
    /// storage"); keys under another namespace's prefix stay refused.
    #[test]
    fn unscoped_sdk_keys_resolve_for_any_namespace() {
        let s = storage("");
        // The drivers bound every store call with a timer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let unscoped = rt
            .block_on(s.offload(
                &StoreContext::default(),
                std::slice::from_ref(&Bytes::from(vec![7u8; 300 * 1024])),
            ))
            .unwrap();
        let Some(reference) = unscoped[0].clone() else {
            panic!("over the threshold: offloaded")
        };
        let Ok(Kind::Reference(r)) = reference::classify(&reference) else {
            panic!("a reference")
        };
        assert!(r.claim["key"].starts_with("v0/d/sha256/"), "{:?}", r.claim);
        for ns in ["a", "b"] {
            let got = rt
                .block_on(s.resolve(Some(ns), vec![(0, r.clone())], &MessageBudget::unlimited()))
                .unwrap();
            assert_eq!(got[0].1.as_ref().map(Bytes::len), Some(300 * 1024), "{ns}");
        }
        let mut scoped = r.clone();
        scoped.claim.insert(
            "key".to_owned(),
            r.claim["key"].replace("v0/d/", "v0/ns/a/d/"),
        );
        let refused = rt
            .block_on(s.resolve(Some("b"), vec![(0, scoped)], &MessageBudget::unlimited()))
            .unwrap_err();
        assert_eq!(refused.kind, StorageFailure::Refused, "{}", refused.reason);
    }
}

#[cfg(test)]
mod part_upload_tests {
    use payload_gateway_drivers::s3::PartUploads;

    use super::DriverSpec;
    use crate::config::{Config, ConfigError};

    /// The S3 driver's `part_*` keys of `[[storage.drivers]]`, with `extra` added.
    fn parts(extra: &str) -> Result<PartUploads, ConfigError> {
        let text = format!(
            "[storage]\ndriver = \"s\"\n[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\nbucket = \"b\"\n{extra}"
        );
        let c = Config::from_toml(&text, Vec::new())?;
        match DriverSpec::parse(0, &c.storage.drivers[0])? {
            DriverSpec::S3(c) => Ok(c.parts),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn s3_part_upload_keys() {
        assert_eq!(parts("").unwrap(), PartUploads::default());
        assert_eq!(parts("").unwrap().threshold, u64::MAX, "off by default");
        let set =
            parts("part_upload_threshold = 16777216\npart_size = 5242880\npart_concurrency = 8\n")
                .unwrap();
        assert_eq!(
            set,
            PartUploads {
                threshold: 16 << 20,
                part_size: 5 << 20,
                concurrency: 8,
            }
        );
        let err = parts("part_size = 1048576\n").unwrap_err();
        assert!(err.to_string().contains("part_size"), "{err}");
        let err = parts("part_concurrency = 0\n").unwrap_err();
        assert!(err.to_string().contains("part_concurrency"), "{err}");
    }
}
