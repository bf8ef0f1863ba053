//! The fuzz body, shared by the cargo-fuzz target (`fuzz/`) and the corpus replay test.
//! Not part of the stable API.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::{MessageType, methods, scan};

/// A valid serialized Payload (`data = "X"`) used as the marking replacement.
pub const MARK: &[u8] = &[0x12, 0x01, b'X'];

/// The message types the fuzzer picks from: every payload-bearing request/response type
/// of every service, plus `google.rpc.Status`, in table order.
pub fn fuzz_types() -> &'static [MessageType] {
    static TYPES: OnceLock<Vec<MessageType>> = OnceLock::new();
    TYPES.get_or_init(|| {
        let mut v: Vec<MessageType> = methods()
            .flat_map(|m| [m.request, m.response])
            .chain(MessageType::by_name("google.rpc.Status"))
            .filter(|t| t.can_hold_payloads())
            .collect();
        v.sort();
        v.dedup();
        v
    })
}

/// Runs one fuzz input: byte 0 picks the type, the rest is the message. Panics on any
/// property violation: identity splice must give the input back, and replacing every
/// payload with [`MARK`] must give a message that scans to the same number of sites,
/// each holding [`MARK`].
pub fn fuzz_one(data: &[u8]) {
    let Some((&pick, msg)) = data.split_first() else {
        return;
    };
    let types = fuzz_types();
    let ty = types[pick as usize % types.len()];
    let input = Bytes::copy_from_slice(msg);
    let Ok(s) = scan(ty, &input) else {
        return;
    };
    let n = s.sites().len();
    let same = s.splice(&input, &vec![None; n]).expect("identity splice");
    assert_eq!(same, input, "identity splice changed the message");
    let explicit: Vec<_> = s
        .sites()
        .iter()
        .map(|site| Some(input.slice(site.range())))
        .collect();
    let same = s
        .splice(&input, &explicit)
        .expect("explicit identity splice");
    assert_eq!(
        same, input,
        "re-inserting the same payloads changed the message"
    );
    for site in s.sites() {
        let _ = site.path().to_string();
        assert!(site.range().end <= input.len());
    }
    if n == 0 {
        return;
    }
    let marked = s
        .splice(&input, &vec![Some(Bytes::from_static(MARK)); n])
        .expect("marking splice");
    let again = scan(ty, &marked).expect("marked message must scan");
    assert_eq!(
        again.sites().len(),
        n,
        "marking changed the number of sites"
    );
    for site in again.sites() {
        assert_eq!(&marked[site.range()], MARK, "site does not hold the mark");
    }
}
