//! What several benches build the same way.

use payload_gateway::codec::PayloadCodec;
use payload_gateway::config::{Config, KeySpec};

/// The key every bench encrypts with.
pub const KEY: [u8; 32] = [0x42; 32];

/// A codec encrypting with [`KEY`] (id `bench`, read from a file in `dir`), compression on.
pub fn keyring_codec(dir: &std::path::Path) -> PayloadCodec {
    let key_file = dir.join("bench.key");
    std::fs::write(&key_file, KEY).unwrap();
    let mut config = Config::default();
    config.encryption.enabled = true;
    config.encryption.keys = vec![KeySpec {
        id: "bench".into(),
        file: Some(key_file),
        env: None,
        kms: None,
    }];
    config.encryption.active_key = Some("bench".into());
    config.encryption.dev_key_file = dir.join("dev.key");
    PayloadCodec::from_config(&config).unwrap()
}
