//! Where the lower layers report what they measured, without depending on [`crate::metrics`].
//!
//! The codec (and anything else below the metrics registry) calls [`sink()`] and records into
//! it; the application installs the Prometheus implementation ([`crate::metrics`]) once at
//! start with [`install`]. Until then, and in a process that never installs one (the
//! `check-config` and `keys audit` commands), the sink discards everything.

use std::sync::OnceLock;

/// Receives the measurements of the lower layers. Every method has a no-op default.
pub trait Sink: Send + Sync {
    /// One lookup of an unwrapped data key in the codec's cache; `hit` when it was there.
    fn dek_lookup(&self, hit: bool) {
        let _ = hit;
    }

    /// One key-service call of `provider` (`aws`, `vault`, ...) and `operation` (`wrap`,
    /// `unwrap`, ...) that ended with `result` (`ok`, `unavailable`, ...) after `seconds`.
    fn kms_call(
        &self,
        provider: &'static str,
        operation: &'static str,
        result: &'static str,
        seconds: f64,
    ) {
        let _ = (provider, operation, result, seconds);
    }
}

/// The sink that discards everything: what [`sink()`] answers before [`install`].
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {}

static SINK: OnceLock<&'static dyn Sink> = OnceLock::new();

/// Installs the process-wide sink. The first call wins; later calls are ignored (the
/// registry is process-wide too), and `false` says the call was one of those.
pub fn install(sink: &'static dyn Sink) -> bool {
    SINK.set(sink).is_ok()
}

/// The installed sink, or [`Discard`] when none is.
pub fn sink() -> &'static dyn Sink {
    static DISCARD: Discard = Discard;
    SINK.get().copied().unwrap_or(&DISCARD)
}
