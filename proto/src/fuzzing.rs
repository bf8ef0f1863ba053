//! The fuzz body, shared by the cargo-fuzz target (`fuzz/`) and the corpus replay test.
//! Not part of the stable API.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::{ENCODED_FAILURE_MESSAGE, FailureEdit, MessageType, methods, scan};

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

/// The `encoded_attributes` the failure fuzz body seals with (`data = "SEALED"`).
pub const SEALED: &[u8] = &[0x12, 0x06, b'S', b'E', b'A', b'L', b'E', b'D'];

/// Runs one input of the `failures` fuzz target (same input format as [`fuzz_one`]).
/// Panics on any property violation:
/// - failure sites lie inside the input, in pre-order (non-decreasing node ranges);
/// - `splice_with` without edits equals `splice`;
/// - every failure with a `message`/`stack_trace` and no `encoded_attributes` is sealed, every
///   one with `encoded_attributes` restored (message `"r"`, attributes dropped), every payload
///   marked: the result scans again, with the same number of failures, sealed ones holding
///   [`SEALED`] as their attributes site and [`ENCODED_FAILURE_MESSAGE`] as message and no
///   stack trace, restored ones holding message `r` and no attributes, and the number of
///   sites changing by exactly the attributes added and removed.
pub fn fuzz_failures(data: &[u8]) {
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
    for f in s.failures() {
        let _ = f.path().to_string();
        for r in [f.message(), f.stack_trace()].into_iter().flatten() {
            assert!(r.start <= r.end && r.end <= input.len());
        }
        if let Some(i) = f.encoded_attributes_site() {
            assert!(i < n && f.has_encoded_attributes());
        }
    }
    let none = vec![None; s.failures().len()];
    let marks = vec![Some(Bytes::from_static(MARK)); n];
    assert_eq!(
        s.splice_with(&input, &marks, &none)
            .expect("splice_with, no edits"),
        s.splice(&input, &marks).expect("splice"),
        "splice_with without edits differs from splice"
    );
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Want {
        Sealed,
        Restored,
        Kept,
    }
    let mut wants = Vec::new();
    let mut removed_sites = 0;
    let edits: Vec<Option<FailureEdit>> = s
        .failures()
        .iter()
        .map(|f| {
            if f.encoded_attributes_site().is_some() {
                wants.push(Want::Restored);
                removed_sites += 1;
                Some(FailureEdit::Restore {
                    message: Some("r".to_owned()),
                    stack_trace: Some(String::new()),
                })
            } else if !f.has_encoded_attributes()
                && (f.message().is_some() || f.stack_trace().is_some())
            {
                wants.push(Want::Sealed);
                Some(FailureEdit::Seal {
                    attributes: Bytes::from_static(SEALED),
                })
            } else {
                wants.push(Want::Kept);
                None
            }
        })
        .collect();
    let sealed = wants.iter().filter(|w| **w == Want::Sealed).count();
    let out = s
        .splice_with(&input, &marks, &edits)
        .expect("edits from the scan's own failure sites apply");
    let again = scan(ty, &out).expect("edited message must scan");
    assert_eq!(
        again.failures().len(),
        s.failures().len(),
        "editing changed the number of failures"
    );
    assert_eq!(
        again.sites().len(),
        n - removed_sites + sealed,
        "editing changed the number of sites unexpectedly"
    );
    for (f, want) in again.failures().iter().zip(&wants) {
        let text = |r: Option<std::ops::Range<usize>>| r.map(|r| &out[r]);
        match want {
            Want::Sealed => {
                assert_eq!(text(f.message()), Some(ENCODED_FAILURE_MESSAGE.as_bytes()));
                assert_eq!(text(f.stack_trace()), None);
                let site = f.encoded_attributes_site().expect("sealed attributes site");
                assert_eq!(&out[again.sites()[site].range()], SEALED);
            }
            Want::Restored => {
                assert_eq!(text(f.message()), Some(&b"r"[..]));
                assert_eq!(text(f.stack_trace()), None);
                assert!(!f.has_encoded_attributes());
            }
            Want::Kept => {}
        }
    }
}
