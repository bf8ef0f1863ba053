//! The `filesystem` driver (the gateway's embedded default): objects as files under a root
//! directory, at `<root>/<key>` with the S3 driver's key layout; the claim is `key`,
//! `hash_algorithm`, `hash_value` (no bucket).
//!
//! On-disk protocol, the one of `object_store`'s `LocalFileSystem` that this driver replaced
//! (files written by either are read by the other): an object is written to a staging file
//! `<key>#<n>` beside it (created exclusively; missing directories are created) and
//! hard-linked into place, so a reader never sees a partial object and an existing object is
//! never replaced; the staging file is then removed. Nothing is synced to disk.
//!
//! Cost: each store and each retrieve is one task on tokio's blocking pool that makes all its
//! file system calls (stat, create, write, link, unlink; open, stat, read), where
//! `LocalFileSystem` hands off once per call (head + put; open + read): the fixed cost of an
//! offloaded payload is dominated by those hand-offs (BENCHMARKS.md, offload round trip).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::layout::{BoundedBody, BucketPolicy, ReadLimit, Scheme, ValidClaim};
use crate::{DriverError, DriverSettings, ListedObject, StorageDriver, Verified};

/// Objects as files under a root directory.
#[derive(Debug)]
pub struct FilesystemDriver {
    settings: DriverSettings,
    root: Arc<Path>,
}

/// Suffixes of staging files (`<key>#<n>`); creation is exclusive, so a suffix taken by
/// another process sharing the directory is skipped.
static STAGING: AtomicU64 = AtomicU64::new(1);

impl FilesystemDriver {
    /// Objects as files under `root` (created if missing).
    pub fn new(
        name: impl Into<String>,
        root: &Path,
        max_payload_size: u64,
    ) -> Result<Self, DriverError> {
        std::fs::create_dir_all(root).map_err(|e| {
            DriverError::Unavailable(format!("cannot create {}: {e}", root.display()))
        })?;
        let root = std::fs::canonicalize(root)
            .map_err(|e| DriverError::Unavailable(format!("cannot use {}: {e}", root.display())))?;
        Ok(Self {
            settings: DriverSettings {
                name: name.into(),
                scheme: Scheme::S3,
                buckets: BucketPolicy::None,
                max_payload_size,
                concurrency: 8,
            },
            root: root.into(),
        })
    }

    /// The file of `key`: `<root>/<key>`. The key passed the layout's checks (relative, no
    /// empty, `.` or `..` segment, no backslash or NUL); a file name of a staging file
    /// (`#` followed by digits only) is refused as well.
    fn file(&self, key: &str) -> Result<PathBuf, DriverError> {
        let name = key.rsplit('/').next().unwrap_or(key);
        if let Some((_, suffix)) = name.split_once('#')
            && !suffix.is_empty()
            && suffix.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(DriverError::ClaimRefused(format!(
                "key {key:?} names a staging file"
            )));
        }
        Ok(self.root.join(key))
    }
}

/// Runs `op` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| DriverError::Unavailable(format!("file system task failed: {e}")))
}

/// Writes `bytes` at `path` unless a file is there already (same key, same content).
fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(()),
        Ok(_) => {
            return Err(std::io::Error::new(
                ErrorKind::AlreadyExists,
                "the object's path is not a file",
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (mut file, staging) = create_staging(path)?;
    let written = file.write_all(bytes).and_then(|()| {
        drop(file);
        match std::fs::hard_link(&staging, path) {
            // Another writer stored the same content first.
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    });
    let _ = std::fs::remove_file(&staging);
    written
}

/// A new, exclusively created staging file `<path>#<n>`, creating missing directories.
fn create_staging(path: &Path) -> std::io::Result<(File, PathBuf)> {
    let mut created_dirs = false;
    loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{}", STAGING.fetch_add(1, Ordering::Relaxed)));
        let staging = PathBuf::from(staging);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => return Ok((file, staging)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound && !created_dirs => {
                let parent = path.parent().ok_or(e)?;
                std::fs::create_dir_all(parent)?;
                created_dirs = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the object at `path`, which `claim` names; its length is checked against `limit`
/// before anything is read, and its SHA-256 taken piece by piece as it is read.
fn read_object(path: &Path, claim: &ValidClaim, limit: ReadLimit) -> Result<Verified, DriverError> {
    let key = &claim.key;
    let unavailable = |e: std::io::Error| DriverError::Unavailable(format!("get {key}: {e}"));
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(DriverError::NotFound(key.to_owned()));
        }
        Err(e) => return Err(unavailable(e)),
    };
    let meta = file.metadata().map_err(unavailable)?;
    if !meta.is_file() {
        return Err(DriverError::NotFound(key.to_owned()));
    }
    limit.check(meta.len())?;
    // The file may grow after the stat: the body reads at most one byte past the limit.
    let mut body = BoundedBody::new(claim, limit, meta.len());
    body.read_from(file, unavailable)?;
    body.finish()
}

#[async_trait]
impl StorageDriver for FilesystemDriver {
    fn settings(&self) -> &DriverSettings {
        &self.settings
    }

    async fn put_absent(
        &self,
        _bucket: Option<&str>,
        key: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let path = self.file(key)?;
        blocking(move || write_once(&path, &payload))
            .await?
            .map_err(|e| DriverError::Unavailable(format!("put {key}: {e}")))
    }

    async fn get(&self, claim: &ValidClaim, limit: ReadLimit) -> Result<Verified, DriverError> {
        let path = self.file(&claim.key)?;
        let claim = claim.clone();
        blocking(move || read_object(&path, &claim, limit)).await?
    }

    /// Walks the directory the prefix lies in; staging files (`<key>#<n>`) are not objects.
    async fn list(
        &self,
        _bucket: Option<&str>,
        prefix: &str,
    ) -> Result<Vec<ListedObject>, DriverError> {
        let dir = match prefix.rsplit_once('/') {
            Some((dir, _)) => self.root.join(dir),
            None => self.root.to_path_buf(),
        };
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut out = Vec::new();
            walk(&root, &dir, &prefix, &mut out)
                .map_err(|e| DriverError::Unavailable(format!("list {prefix}: {e}")))?;
            Ok(out)
        })
        .await?
    }

    async fn delete(&self, _bucket: Option<&str>, key: &str) -> Result<(), DriverError> {
        let path = self.file(key)?;
        let key = key.to_owned();
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::Unavailable(format!("delete {key}: {e}"))),
        })
        .await?
    }
}

/// Adds every object file under `dir` whose key (its path relative to `root`) starts with
/// `prefix` to `out`; a missing directory holds nothing.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ListedObject>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, prefix, out)?;
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let Some(key) = path
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
            .map(|p| p.replace(std::path::MAIN_SEPARATOR, "/"))
        else {
            continue;
        };
        let name = key.rsplit('/').next().unwrap_or(&key);
        let staging = name.split_once('#').is_some_and(|(_, suffix)| {
            !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
        });
        if staging || !key.starts_with(prefix) {
            continue;
        }
        let meta = entry.metadata()?;
        out.push(ListedObject {
            bucket: None,
            key,
            size: meta.len(),
            last_modified: meta.modified()?,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{self, KeyField};
    use crate::{Fetch, test_context as ctx};
    use object_store::local::LocalFileSystem;
    use object_store::path::Path as ObjectPath;
    use object_store::{ObjectStore, PutPayload};

    /// Every file under `dir`, relative, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn round_trip_at_the_key_path() {
        let dir = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new("local", dir.path(), 1 << 20).unwrap();
        let payloads = vec![Bytes::from_static(b"one"), Bytes::from(vec![7u8; 100_000])];
        let claims = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert!(claims[0]["key"].starts_with("v0/ns/default/wt/T/wi/w%201/ri/null/d/sha256/"));
        assert!(!claims[0].contains_key("bucket"));
        // Same content again: same claim, nothing new on disk, no staging file left.
        let again = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert_eq!(claims, again);
        let keys: Vec<String> = claims.iter().map(|c| c["key"].clone()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(files(dir.path()), sorted);
        assert_eq!(std::fs::read(dir.path().join(&keys[0])).unwrap(), b"one");
        let back = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap();
        assert_eq!(back, payloads);
        let err = driver
            .retrieve(Some("other"), Fetch::undeclared(claims))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    }

    #[tokio::test]
    async fn concurrent_stores_of_the_same_content_agree() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FilesystemDriver::new("local", dir.path(), 1 << 20).unwrap());
        let payload = Bytes::from(vec![3u8; 50_000]);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (driver, payload) = (driver.clone(), payload.clone());
                tokio::spawn(async move { driver.store(&ctx(), vec![payload]).await })
            })
            .collect();
        let mut claims = Vec::new();
        for t in tasks {
            claims.push(t.await.unwrap().unwrap());
        }
        assert!(claims.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(files(dir.path()), vec![claims[0][0]["key"].clone()]);
        let back = driver
            .retrieve(Some("default"), Fetch::undeclared(claims[0].clone()))
            .await;
        assert_eq!(back.unwrap(), vec![payload]);
    }

    #[tokio::test]
    async fn tampered_missing_oversized_and_directory_objects_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new("local", dir.path(), 1000).unwrap();
        let claims = driver
            .store(&ctx(), vec![Bytes::from_static(b"tamper me")])
            .await
            .unwrap();
        let file = dir.path().join(&claims[0]["key"]);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let err = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
        // Grown past the driver's limit on disk: refused before it is read whole.
        std::fs::write(&file, vec![0u8; 1001]).unwrap();
        let err = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::TooLarge {
                    size: 1001,
                    limit: 1000
                }
            ),
            "{err}"
        );
        std::fs::remove_file(&file).unwrap();
        let err = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::NotFound(_)), "{err}");
        // A directory where the object belongs: not found on read, refused on write.
        std::fs::create_dir(&file).unwrap();
        let err = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::NotFound(_)), "{err}");
        let err = driver
            .store(&ctx(), vec![Bytes::from_static(b"tamper me")])
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::Unavailable(_)), "{err}");
    }

    #[tokio::test]
    async fn staging_file_names_are_refused_as_keys() {
        let dir = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new("local", dir.path(), 1000).unwrap();
        let mut claim = driver
            .store(&ctx(), vec![Bytes::from_static(b"x")])
            .await
            .unwrap()
            .remove(0);
        let key = format!("{}#1", claim["key"]);
        claim.insert("key".to_owned(), key);
        let err = driver
            .retrieve(Some("default"), Fetch::undeclared([claim]))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    }

    #[tokio::test]
    async fn object_store_local_file_system_reads_and_writes_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new("local", dir.path(), 1 << 20).unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        // Written here, read by LocalFileSystem.
        let claims = driver
            .store(&ctx(), vec![Bytes::from_static(b"ours")])
            .await
            .unwrap();
        let path = ObjectPath::parse(&claims[0]["key"]).unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(got, Bytes::from_static(b"ours"));
        // Written by LocalFileSystem at the key this driver computes, read here.
        let theirs = Bytes::from_static(b"theirs");
        let hex = layout::sha256_hex(&theirs);
        let key = layout::object_key(&ctx(), &hex);
        store
            .put(
                &ObjectPath::parse(&key).unwrap(),
                PutPayload::from_bytes(theirs.clone()),
            )
            .await
            .unwrap();
        let claim = layout::make_claim(None, KeyField::Key, &key, &hex);
        let back = driver
            .retrieve(Some("default"), Fetch::undeclared([claim]))
            .await
            .unwrap();
        assert_eq!(back, vec![theirs]);
    }

    /// Process CPU time (user + system) from /proc, in clock ticks (1/100 s here).
    fn cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// CPU per 1 KiB store + retrieve round trip: this driver against the calls the
    /// `object_store` `LocalFileSystem` path made (head, put with create, get, read), on a
    /// two-worker runtime. Not a check (timings on a shared machine): run it by hand with
    /// `cargo test --profile ci -p payload-gateway-drivers -- --ignored --nocapture round_trip_cpu`.
    #[test]
    #[ignore]
    fn round_trip_cpu() {
        const N: usize = 10_000;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let payload = |i: usize| {
            let mut p = vec![0u8; 1024];
            p[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Bytes::from(p)
        };
        for round in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let driver = FilesystemDriver::new("local", dir.path(), 1 << 20).unwrap();
            let t0 = cpu_ticks();
            rt.block_on(async {
                for i in 0..N {
                    let claims = driver.store(&ctx(), vec![payload(i)]).await.unwrap();
                    driver
                        .retrieve(Some("default"), Fetch::undeclared(claims))
                        .await
                        .unwrap();
                }
            });
            let ours = (cpu_ticks() - t0) as f64 * 10_000.0 / N as f64;
            let dir = tempfile::tempdir().unwrap();
            let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
            let t0 = cpu_ticks();
            rt.block_on(async {
                for i in 0..N {
                    let p = payload(i);
                    let hex = layout::sha256_hex(&p);
                    let key = layout::object_key(&ctx(), &hex);
                    let path = ObjectPath::parse(&key).unwrap();
                    assert!(store.head(&path).await.is_err());
                    let opts = object_store::PutOptions {
                        mode: object_store::PutMode::Create,
                        ..Default::default()
                    };
                    store
                        .put_opts(&path, PutPayload::from_bytes(p), opts)
                        .await
                        .unwrap();
                    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
                    assert_eq!(layout::sha256_hex(&got), hex);
                }
            });
            let theirs = (cpu_ticks() - t0) as f64 * 10_000.0 / N as f64;
            println!(
                "round {round}: 1 KiB store + retrieve, process CPU per round trip: this driver \
                 {ours:.0} us, LocalFileSystem calls {theirs:.0} us ({:.2}x)",
                theirs / ours
            );
        }
    }
}
