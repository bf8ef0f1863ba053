//! Developer tool: record the messages the gateway walks, in the walker fuzz corpus format
//! (`fuzz/corpus/walker/`: one byte choosing the message type among
//! `payload_gateway_proto::fuzzing::fuzz_types()`, then the message), so the fuzzer starts from
//! real traffic.
//!
//! Compiled in only with the cargo feature `debug-capture` (never in release builds), then
//! enabled by the environment variable [`CAPTURE_ENV`]. The files hold payloads as they cross
//! the gateway, **plaintext included**. A build without the feature ignores the variable and
//! logs an error saying so.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use payload_gateway_proto::MessageType;
use payload_gateway_proto::fuzzing::fuzz_types;

/// The environment variable naming the capture directory.
pub const CAPTURE_ENV: &str = "PGW_DEBUG_CAPTURE_PLAINTEXT_DIR";

/// Writes walked messages into a directory.
#[derive(Debug)]
pub struct Capture {
    dir: PathBuf,
    seq: AtomicU64,
}

impl Capture {
    /// A capture into `$PGW_DEBUG_CAPTURE_PLAINTEXT_DIR`, when set.
    pub fn from_env() -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os(CAPTURE_ENV)?);
        if !cfg!(feature = "debug-capture") {
            tracing::error!(
                "{CAPTURE_ENV} is set but this build has no plaintext capture (cargo feature \
                 `debug-capture`): ignored, nothing is written"
            );
            return None;
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot create the capture directory; not capturing");
            return None;
        }
        tracing::warn!(dir = %dir.display(), "{CAPTURE_ENV} is set: walked messages, plaintext payloads included, are written to disk");
        Some(Self {
            dir,
            seq: AtomicU64::new(0),
        })
    }

    /// Records one message of type `ty`; failures are logged, never fatal.
    pub fn record(&self, ty: MessageType, message: &[u8]) {
        let Some(index) = fuzz_types().iter().position(|t| *t == ty) else {
            return;
        };
        let Ok(selector) = u8::try_from(index) else {
            return;
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let short = ty.name().rsplit('.').next().unwrap_or_default();
        let path = self
            .dir
            .join(format!("{short}-{}-{seq}", std::process::id()));
        let mut data = Vec::with_capacity(message.len() + 1);
        data.push(selector);
        data.extend_from_slice(message);
        if let Err(e) = std::fs::write(&path, data) {
            tracing::warn!(path = %path.display(), error = %e, "capture failed");
        }
    }
}
