//! Replays the checked-in seed corpora of the cargo-fuzz targets `grpc_frame` and
//! `codec_json` (`fuzz/corpus/<target>/`) through the very fuzz bodies the targets run
//! (`fuzz/fuzz_targets/bodies.rs`, included below), so CI checks them on stable Rust.
//! Crash inputs found by fuzzing belong in the corpus directory: this test then keeps them
//! fixed.

use std::path::Path;

#[path = "../../fuzz/fuzz_targets/bodies.rs"]
mod bodies;

fn replay(target: &str, body: fn(&[u8]), min: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus directory") {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(
                outcome.is_ok(),
                "{target}: corpus file {} fails",
                path.display()
            );
            n += 1;
        }
    }
    assert!(
        n >= min,
        "expected a seeded corpus in {}, found {n} files",
        dir.display()
    );
}

#[test]
fn replay_grpc_frame_corpus() {
    replay("grpc_frame", bodies::grpc_frame, 15);
}

#[test]
fn replay_codec_json_corpus() {
    replay("codec_json", bodies::codec_json, 15);
}

#[test]
fn replay_storage_reference_corpus() {
    replay("storage_reference", bodies::storage_reference, 8);
}

#[test]
fn replay_visibility_query_corpus() {
    replay("visibility_query", bodies::visibility_query, 20);
}
