//! Baselines measured by the tool at the start of the same run, single thread: the raw
//! codec calls (zstd level 3 + AES-256-GCM, encode + decode) and the raw file write + read
//! the gateway's filesystem driver performs per offloaded payload.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use prost::Message;
use temporalio_protos::protos::temporal::api::common::v1::Payload;

/// Raw zstd (level 3, reused context) + AES-256-GCM seal, then open + decompress, of the
/// serialized payload, single thread: the per-core ceiling for one encode + one decode, in
/// the thread's CPU seconds per round trip.
pub fn raw_codec_secs_per_roundtrip(p: &Payload, budget: Duration) -> Result<f64> {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let raw = p.encode_to_vec();
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow!("key"))?);
    let mut comp = zstd::bulk::Compressor::new(3)?;
    let mut decomp = zstd::bulk::Decompressor::new()?;
    let t0 = Instant::now();
    let c0 = thread_cpu_secs();
    let mut n = 0u64;
    while t0.elapsed() < budget && n < 100_000 {
        let mut buf = comp.compress(&raw)?;
        let nonce = [n as u8; 12];
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| anyhow!("seal"))?;
        buf.extend_from_slice(tag.as_ref());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| anyhow!("open"))?;
        let out = decomp.decompress(plain, raw.len())?;
        assert_eq!(out.len(), raw.len());
        n += 1;
    }
    // CPU time, as the gateway's side is measured: wall time would count the time the thread
    // waited for a core the machine's other work held.
    Ok((thread_cpu_secs() - c0) / n as f64)
}

/// The serialized payload after zstd level 3 + AES-256-GCM (12-byte nonce + ciphertext +
/// 16-byte tag): about what the gateway offloads for it (its object adds the envelope's
/// metadata).
pub fn encoded_like_gateway(p: &Payload) -> Result<Vec<u8>> {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow!("key"))?);
    let mut buf = zstd::bulk::compress(&p.encode_to_vec(), 3)?;
    let nonce = [9u8; 12];
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
        .map_err(|_| anyhow!("seal"))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

/// What [`raw_store_cpu_per_roundtrip`] does, for table headers.
pub const RAW_STORE_STEPS: &str = "open(final) → ENOENT (the driver's existence check), \
open(staging, O_CREAT|O_EXCL) + write + fstat + link(staging, final) + unlink(staging) + close, \
then open + fstat + lseek + read to EOF + close; no fsync (the filesystem driver, \
`drivers/src/filesystem.rs`, does none; it runs these steps in one blocking task per store \
and one per retrieve)";

/// CPU time of this thread (user + system), seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds (user + system, this thread) of one write + read of `bytes` as a new file
/// under `dir`, the way the filesystem driver stores and resolves an object
/// ([`RAW_STORE_STEPS`]); object names are 64 hex digits in a 12-level directory like the
/// driver's key layout. Files are removed in batches outside the timed part, so at most one
/// batch (≤ 64 files, ≤ 32 MiB) is on disk at a time. Bounded by `budget` (wall) and 20,000
/// round trips.
pub fn raw_store_cpu_per_roundtrip(bytes: &[u8], dir: &Path, budget: Duration) -> Result<f64> {
    let leaf = dir.join("v0/ns/default/wt/LoadWorkflow/wi/pgw-load/ri/null/d/sha256");
    std::fs::create_dir_all(&leaf)?;
    let batch = (32usize << 20).div_euclid(bytes.len().max(1)).clamp(1, 64);
    let t0 = Instant::now();
    let (mut n, mut cpu) = (0u64, 0.0f64);
    let mut written = Vec::with_capacity(batch);
    while t0.elapsed() < budget && n < 20_000 {
        let c0 = thread_cpu_secs();
        for _ in 0..batch {
            let path = leaf.join(format!("{:064x}", n ^ 0x5eed_0000_0000));
            n += 1;
            // the driver's `head`: open → not found
            match File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Ok(_) => bail!("{} exists", path.display()),
                Err(e) => return Err(e.into()),
            }
            let mut staging = path.clone().into_os_string();
            staging.push("#1");
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&staging)?;
            f.write_all(bytes)?;
            let _ = f.metadata()?;
            std::fs::hard_link(&staging, &path)?;
            std::fs::remove_file(&staging)?;
            drop(f);
            // the driver's `get` + `bytes`
            let mut f = File::open(&path)?;
            let len = f.metadata()?.len() as usize;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
            let mut back = Vec::with_capacity(len);
            f.read_to_end(&mut back)?;
            if back.len() != bytes.len() {
                bail!("read back {} of {} bytes", back.len(), bytes.len());
            }
            written.push(path);
        }
        cpu += thread_cpu_secs() - c0;
        for p in written.drain(..) {
            std::fs::remove_file(p)?;
        }
    }
    Ok(cpu / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw store round trip reads back what it wrote, measures some CPU time and leaves
    /// no object or staging file behind.
    #[test]
    fn raw_store_round_trip_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = vec![0x5a; 3000];
        let per =
            raw_store_cpu_per_roundtrip(&bytes, dir.path(), Duration::from_millis(50)).unwrap();
        assert!(per > 0.0 && per < 0.05, "{per}");
        let mut left = 0;
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    left += 1;
                }
            }
        }
        assert_eq!(left, 0);
    }
}
