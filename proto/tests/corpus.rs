//! Replays the fuzz corpora through the fuzz bodies, so CI checks them without a nightly
//! toolchain: `fuzz/corpus/walker/` through the walker body, and `fuzz/corpus/failures/`
//! (plus the walker corpus, whose messages hold failures too) through the failure body.

use std::path::Path;

use payload_gateway_proto::fuzzing::{fuzz_failures, fuzz_one};

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
            assert!(outcome.is_ok(), "corpus file {} fails", path.display());
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
fn replay_fuzz_corpus() {
    replay("walker", fuzz_one, 20);
}

#[test]
fn replay_failures_corpus() {
    replay("failures", fuzz_failures, 10);
}

#[test]
fn replay_walker_corpus_through_failures() {
    replay("walker", fuzz_failures, 20);
}
