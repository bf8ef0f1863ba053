//! Replays every file of the fuzz corpus (`fuzz/corpus/walker/`) through the fuzz body, so
//! CI checks the corpus without a nightly toolchain.

use std::path::Path;

#[test]
fn replay_fuzz_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/walker");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus directory") {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            payload_gateway_proto::fuzzing::fuzz_one(&data);
            n += 1;
        }
    }
    assert!(
        n >= 20,
        "expected a seeded corpus in {}, found {n} files",
        dir.display()
    );
}
