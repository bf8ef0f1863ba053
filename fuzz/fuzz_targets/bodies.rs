//! Fuzz bodies shared by the cargo-fuzz targets (`grpc_frame`, `codec_json`) and the stable
//! corpus replay in `proxy/tests/fuzz_corpus.rs` (both include this file with `#[path]`), so
//! the checked-in corpora exercise exactly what the fuzzer runs.

#![allow(dead_code)] // each target uses one body

use std::io::Write;

use bytes::Bytes;
use payload_gateway::budget::{MessageBudget, ProcessBudget};
use payload_gateway::codec_server::json::{Payload, parse_payloads, write_payloads};
use payload_gateway::grpc::frame::{self, Encoding, FrameError, PREFIX_LEN};

/// `grpc_frame` input: byte 0 picks the mode and encoding (bit 0x40: a unary call, whose
/// second message is refused), bytes 1..3 the message size limit (0..=65535 bytes), which is
/// also the inflation budget, the rest is the body (modes 0-2) or a message to compress
/// (mode 3).
///
/// Properties: `split` never panics and never returns a message above the limit; a unary
/// split returns at most one message and never inflates past the budget; a body it
/// accepts, re-framed uncompressed by `encode`, splits again to the same messages; with
/// identity and only flag-0 frames, re-framing gives the body back byte for byte; a gzip (or
/// zlib) frame of a message inflates to exactly that message when it fits the limit, and to
/// `TooLarge` otherwise.
pub fn grpc_frame(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let selector = data[0];
    let limit = u16::from_be_bytes([data[1], data[2]]) as usize;
    let rest = &data[3..];
    let encoding = match selector % 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Deflate,
    };
    if selector & 0x80 != 0 && encoding != Encoding::Identity {
        compressed_frame(rest, encoding, limit);
        return;
    }
    let body = Bytes::copy_from_slice(rest);
    let unary = selector & 0x40 != 0;
    let budget = MessageBudget::new(ProcessBudget::unlimited(), limit);
    let result = frame::split(&body, encoding, limit, unary, &budget);
    assert!(budget.used() <= limit, "inflated past the budget");
    match result {
        Ok(messages) => {
            assert!(
                messages.iter().all(|m| m.len() <= limit),
                "message over the limit"
            );
            assert!(
                !unary || messages.len() <= 1,
                "unary split returned two messages"
            );
            let total: usize = messages.iter().map(|m| m.len() + PREFIX_LEN).sum();
            let reframed = frame::join(frame::encode(messages.clone()).expect("small"), total);
            assert_eq!(reframed.len(), total);
            let again = frame::split(
                &reframed,
                Encoding::Identity,
                limit,
                false,
                &MessageBudget::unlimited(),
            )
            .expect("re-framed body must split");
            assert_eq!(again, messages, "re-framed body splits differently");
            if frames_all_uncompressed(rest) {
                assert_eq!(
                    &reframed[..],
                    rest,
                    "identity re-framing must give the body back"
                );
            }
        }
        Err(
            FrameError::Truncated { .. }
            | FrameError::InvalidFlag(_)
            | FrameError::TooLarge { .. }
            | FrameError::Budget(_),
        ) => {}
        Err(FrameError::NotUnary) => assert!(unary, "only unary splits refuse a second message"),
        Err(FrameError::Unframeable(_)) => panic!("split never frames"),
        Err(FrameError::UnsupportedEncoding(_)) => {
            assert_eq!(encoding, Encoding::Identity, "gzip/deflate are supported");
        }
        Err(FrameError::Corrupt { .. }) => assert_ne!(encoding, Encoding::Identity),
    }
}

fn frames_all_uncompressed(body: &[u8]) -> bool {
    let mut offset = 0;
    while offset < body.len() {
        if body[offset] != 0 {
            return false;
        }
        let len = u32::from_be_bytes([
            body[offset + 1],
            body[offset + 2],
            body[offset + 3],
            body[offset + 4],
        ]) as usize;
        offset += PREFIX_LEN + len;
    }
    true
}

fn compressed_frame(message: &[u8], encoding: Encoding, limit: usize) {
    let compressed = match encoding {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(message).unwrap();
            e.finish().unwrap()
        }
        _ => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(message).unwrap();
            e.finish().unwrap()
        }
    };
    let mut body = vec![1u8];
    body.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    body.extend_from_slice(&compressed);
    match frame::split(
        &Bytes::from(body),
        encoding,
        limit,
        true,
        &MessageBudget::unlimited(),
    ) {
        Ok(messages) => {
            assert!(
                compressed.len() <= limit && message.len() <= limit,
                "accepted over the limit"
            );
            assert_eq!(messages.len(), 1);
            assert_eq!(&messages[0][..], message, "inflated message differs");
        }
        Err(FrameError::TooLarge { .. }) => {
            assert!(
                compressed.len() > limit || message.len() > limit,
                "refused a message within the limit"
            );
        }
        Err(e) => panic!("a well-formed compressed frame failed: {e}"),
    }
}

/// `codec_json` input: byte 0 < 0x80: the rest is a codec request body (proto3 JSON of
/// `Payloads`); otherwise the rest is a serialized `Payload` (protobuf).
///
/// Properties: parsing never panics; whatever parses is written back as JSON that parses to
/// the same payloads (write ∘ parse is a fixed point), and each payload survives the protobuf
/// round trip the pipeline does (`to_bytes` / `from_bytes`); any protobuf `Payload` written as
/// JSON parses back to itself (every metadata key and byte, `externalPayloads` sizes).
pub fn codec_json(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector < 0x80 {
        let Ok(payloads) = parse_payloads(rest) else {
            return;
        };
        check_round_trip(&payloads);
    } else if let Ok(payload) = Payload::from_bytes(rest) {
        check_round_trip(std::slice::from_ref(&payload));
    }
}

fn check_round_trip(payloads: &[Payload]) {
    let written = write_payloads(payloads);
    let value: serde_json::Value =
        serde_json::from_slice(&written).expect("written body must be JSON");
    assert_eq!(
        value["payloads"].as_array().map(Vec::len),
        Some(payloads.len())
    );
    let parsed = parse_payloads(&written).expect("written body must parse");
    assert_eq!(parsed, payloads, "JSON round trip changed the payloads");
    for p in payloads {
        let back = Payload::from_bytes(&p.to_bytes()).expect("protobuf round trip");
        assert_eq!(&back, p, "protobuf round trip changed the payload");
    }
}

/// `storage_reference` input: a serialized `Payload`.
///
/// Properties: recognition never panics; what it accepts as a forwardable reference is read
/// as the same reference by the decode path (`classify`), carries only the metadata keys of
/// its form and re-encodes to exactly the input (no unknown fields can ride along); a
/// reference the gateway builds from it is accepted again.
pub fn storage_reference(data: &[u8]) {
    use payload_gateway::storage::reference::{Kind, build, classify, strict_reference};
    let Some(r) = strict_reference(data) else {
        return;
    };
    match classify(&Bytes::copy_from_slice(data)) {
        Ok(Kind::Reference(read)) => {
            assert_eq!(
                read.driver_name, r.driver_name,
                "decode reads another driver"
            );
            assert_eq!(read.claim, r.claim, "decode reads another claim");
            assert_eq!(read.declared_size, r.declared_size);
        }
        other => panic!("strictly recognised but classified as {other:?}"),
    }
    let size = r.declared_size.unwrap_or(0).min(1 << 40) as usize;
    let rebuilt = build(&r.driver_name, &r.claim, size);
    let again = strict_reference(&rebuilt).expect("a built reference is strictly recognised");
    assert_eq!(again.claim, r.claim);
}

/// `visibility_query` input: byte 0 picks which names are protected (bit 0: `Email`, bit 1:
/// `Tags`), the rest is a visibility query (lossily UTF-8).
///
/// Properties: parsing never panics and nests no deeper than its limit; protecting names only
/// ever refuses more, never accepts what the unprotected parse refuses; a rewritten query
/// parses again, with as many protected comparisons (now of tokens) as the original, and
/// contains none of the replaced literals' text unless a token repeats it.
pub fn visibility_query(data: &[u8]) {
    use payload_gateway::search_attributes::query::{QueryError, check, rewrite};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let query = String::from_utf8_lossy(rest);
    let protected =
        |name: &str| (pick & 1 != 0 && name == "Email") || (pick & 2 != 0 && name == "Tags");
    let open = check(&query, |_| false);
    let guarded = check(&query, protected);
    if guarded.is_ok() {
        assert!(
            open.is_ok(),
            "protection accepted what the grammar refuses: {query:?}"
        );
    }
    let rewritten = rewrite(&query, protected, |attribute, value| {
        Ok::<_, QueryError>(vec![
            format!("pgw1:a:{}", value.len()),
            format!("pgw1:b:{attribute}"),
        ])
    });
    match (&guarded, rewritten) {
        (Ok(0), Ok(out)) => assert_eq!(out, None, "nothing protected, yet rewritten"),
        (Ok(n), Ok(Some(out))) => {
            let again = check(&out, protected).expect("a rewritten query parses again");
            assert_eq!(
                again, *n,
                "rewriting changed the number of protected comparisons"
            );
        }
        (Ok(_), other) => panic!("parsed with uses but rewrite gave {other:?}"),
        (Err(e), Err(r)) => assert_eq!(e, &r, "check and rewrite disagree"),
        (Err(e), Ok(out)) => panic!("check refused ({e}) but rewrite gave {out:?}"),
    }
}
