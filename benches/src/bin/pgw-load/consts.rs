//! The constants every part of a run shares (a leaf: imports nothing of the crate).

/// The bench's AES-256 key (32 bytes, base64), given to the gateways as `PGW_LOAD_KEY`.
pub(crate) const KEY_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, bench only
/// The Temporal namespace of every request.
pub(crate) const NAMESPACE: &str = "default";
/// The bearer token every request carries; `gw-auth` grants it [`NAMESPACE`] (given to the
/// gateways as `PGW_LOAD_TOKENS`).
pub(crate) const TOKEN: &str = "pgw-load-bench-token"; // bench only
