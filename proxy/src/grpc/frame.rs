//! gRPC length-prefixed message framing: a 1-byte compressed flag, a 4-byte big-endian length,
//! then the message. Compressed messages are inflated here so the payload walker always sees
//! plain protobuf; rewritten messages go out uncompressed (flag 0), which every gRPC peer
//! accepts whatever `grpc-encoding` says.

use std::io::Read;

use bytes::{Bytes, BytesMut};

use crate::budget::{Exhausted, MessageBudget};

/// Length of the prefix before each message.
pub const PREFIX_LEN: usize = 5;

/// Why a gRPC body could not be split into messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The body ends inside a prefix or a message.
    #[error("truncated gRPC frame: {needed} bytes announced, {available} present")]
    Truncated {
        /// Bytes the prefix announced (or the prefix length).
        needed: usize,
        /// Bytes left in the body.
        available: usize,
    },
    /// The compressed flag is neither 0 nor 1.
    #[error("invalid gRPC compressed flag {0}")]
    InvalidFlag(u8),
    /// A message is bigger than the configured limit.
    #[error("gRPC message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The (inflated) size seen so far.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A compressed message arrived with an encoding the gateway cannot inflate.
    #[error("unsupported grpc-encoding {0:?}")]
    UnsupportedEncoding(String),
    /// A unary call's body holds more than one message.
    #[error(
        "unary call carries bytes after its gRPC message (a second message or a partial frame); \
         refused before reading them"
    )]
    NotUnary,
    /// A rewritten message does not fit the 4-byte length prefix.
    #[error("message of {0} bytes does not fit a gRPC length prefix (4 GiB)")]
    Unframeable(usize),
    /// Inflating would pass the message or process memory budget.
    #[error("{0}")]
    Budget(#[from] Exhausted),
    /// Inflating failed.
    #[error("corrupt {encoding} message: {reason}")]
    Corrupt {
        /// The encoding.
        encoding: &'static str,
        /// What the decompressor said.
        reason: String,
    },
}

/// Message compression named by the `grpc-encoding` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No compression declared.
    Identity,
    /// `gzip`.
    Gzip,
    /// `deflate` (zlib).
    Deflate,
}

impl Encoding {
    /// Parses a `grpc-encoding` value; `None` header means identity.
    pub fn from_header(value: Option<&str>) -> Result<Self, FrameError> {
        match value.map(str::trim) {
            None | Some("") | Some("identity") => Ok(Self::Identity),
            Some("gzip") => Ok(Self::Gzip),
            Some("deflate") => Ok(Self::Deflate),
            Some(other) => Err(FrameError::UnsupportedEncoding(other.to_owned())),
        }
    }
}

/// Joins body chunks into one buffer without copying when there is only one.
pub fn join(chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(len);
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
    }
    buf.freeze()
}

/// Splits a complete gRPC body into its messages, inflating compressed ones.
///
/// `unary`: the call sends one message at most, and a second one is refused before it is
/// inflated. Inflated bytes are charged to `budget` as they are produced, in addition to
/// `limit` per message.
pub fn split(
    body: &Bytes,
    encoding: Encoding,
    limit: usize,
    unary: bool,
    budget: &MessageBudget,
) -> Result<Vec<Bytes>, FrameError> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < body.len() {
        if unary && !messages.is_empty() {
            return Err(FrameError::NotUnary);
        }
        let available = body.len() - offset;
        if available < PREFIX_LEN {
            return Err(FrameError::Truncated {
                needed: PREFIX_LEN,
                available,
            });
        }
        let flag = body[offset];
        let len = u32::from_be_bytes([
            body[offset + 1],
            body[offset + 2],
            body[offset + 3],
            body[offset + 4],
        ]) as usize;
        if len > limit {
            return Err(FrameError::TooLarge { size: len, limit });
        }
        let start = offset + PREFIX_LEN;
        if body.len() - start < len {
            return Err(FrameError::Truncated {
                needed: len,
                available: body.len() - start,
            });
        }
        let message = body.slice(start..start + len);
        messages.push(match flag {
            0 => message,
            1 => inflate(&message, encoding, limit, budget)?,
            other => return Err(FrameError::InvalidFlag(other)),
        });
        offset = start + len;
    }
    Ok(messages)
}

/// Inflates one compressed message, reading at most `limit` bytes of output and charging
/// every byte of capacity it allocates to `budget` first.
///
/// Read as the Temporal server's Go readers read it, so that nothing is left for a second
/// reader to see: gzip reads every member (Go's `gzip.Reader` is multistream by default), and
/// anything after the compressed stream that is not another member is an error, as is an
/// empty compressed message.
fn inflate(
    message: &[u8],
    encoding: Encoding,
    limit: usize,
    budget: &MessageBudget,
) -> Result<Bytes, FrameError> {
    let name = match encoding {
        Encoding::Gzip => "gzip",
        Encoding::Deflate => "deflate",
        Encoding::Identity => {
            return Err(FrameError::UnsupportedEncoding(
                "compressed message without grpc-encoding".to_owned(),
            ));
        }
    };
    let corrupt = |reason: String| FrameError::Corrupt {
        encoding: name,
        reason,
    };
    if message.is_empty() {
        return Err(corrupt("empty compressed message".to_owned()));
    }
    match encoding {
        Encoding::Gzip => read_limited(
            flate2::bufread::MultiGzDecoder::new(message),
            limit,
            gzip_size_hint(message),
            budget,
            corrupt,
        ),
        _ => {
            let mut reader = flate2::bufread::ZlibDecoder::new(message);
            let hint = message.len().saturating_mul(4);
            let out = read_limited(&mut reader, limit, hint, budget, corrupt)?;
            if !reader.get_ref().is_empty() {
                return Err(corrupt(format!(
                    "{} bytes after the end of the compressed stream",
                    reader.get_ref().len()
                )));
            }
            Ok(out)
        }
    }
}

/// Reads `reader` to its end into one buffer of at most `limit` bytes, charging capacity to
/// `budget` before allocating it. `hint`: the size the stream announces (gzip's `ISIZE`),
/// reserved up front so a truthful one is read without growing the buffer; the decoder
/// writes straight into the buffer.
fn read_limited(
    mut reader: impl Read,
    limit: usize,
    hint: usize,
    budget: &MessageBudget,
    corrupt: impl Fn(String) -> FrameError,
) -> Result<Bytes, FrameError> {
    let mut out: Vec<u8> = Vec::new();
    let mut next = hint.max(64 * 1024).min(limit.max(1));
    loop {
        if out.len() == out.capacity() {
            // Full (or not started): is there more? Only then is the buffer grown.
            let mut probe = [0u8; 1];
            let n = reader
                .read(&mut probe)
                .map_err(|e| corrupt(e.to_string()))?;
            if n == 0 {
                return Ok(Bytes::from(out));
            }
            if out.len() >= limit {
                return Err(FrameError::TooLarge {
                    size: out.len() + n,
                    limit,
                });
            }
            let capacity = next.min(limit).max(out.len() + 1);
            budget.charge(capacity - out.capacity())?;
            out.reserve_exact(capacity - out.len());
            next = capacity.saturating_mul(2);
            out.push(probe[0]);
        }
        let room = (out.capacity() - out.len()) as u64;
        (&mut reader)
            .take(room)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(e.to_string()))?;
        if out.len() < out.capacity() {
            return Ok(Bytes::from(out));
        }
    }
}

/// The size a gzip stream announces for its (last) member: the `ISIZE` trailer, the input
/// size modulo 2^32. A hint only (several members, or a lie): bounded by what `message` can
/// inflate to at deflate's best ratio (1032:1), so a small message never reserves much.
fn gzip_size_hint(message: &[u8]) -> usize {
    let Some(trailer) = message.len().checked_sub(4).map(|at| &message[at..]) else {
        return 0;
    };
    let isize = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as usize;
    isize.min(message.len().saturating_mul(1032))
}

/// Messages up to this size are copied behind their prefix into one chunk: one DATA frame
/// instead of two, and never an empty one.
const COALESCE_MAX: usize = 16 * 1024;

/// Frames messages uncompressed, as body chunks. A small message shares a chunk with its
/// prefix; a large one follows its prefix as a chunk of its own, so its bytes are not copied.
/// No chunk is ever empty: some peers (sdk-core's h2) count empty DATA frames as abuse and
/// close the connection.
pub fn encode(messages: Vec<Bytes>) -> Result<Vec<Bytes>, FrameError> {
    encode_pieces(messages.into_iter().map(|m| vec![m]).collect())
}

/// [`encode`] for messages given as pieces (each message is the concatenation of its pieces,
/// as a rewrite that shares large payloads returns it): a small message is copied behind its
/// prefix into one chunk; a large one keeps its pieces as chunks, not copied.
pub fn encode_pieces(messages: Vec<Vec<Bytes>>) -> Result<Vec<Bytes>, FrameError> {
    let mut chunks = Vec::with_capacity(messages.len() * 2);
    for pieces in messages {
        let len: usize = pieces.iter().map(Bytes::len).sum();
        if u32::try_from(len).is_err() {
            return Err(FrameError::Unframeable(len));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[1..].copy_from_slice(&(len as u32).to_be_bytes());
        if len <= COALESCE_MAX {
            let mut chunk = BytesMut::with_capacity(PREFIX_LEN + len);
            chunk.extend_from_slice(&prefix);
            for piece in &pieces {
                chunk.extend_from_slice(piece);
            }
            chunks.push(chunk.freeze());
        } else {
            chunks.push(Bytes::copy_from_slice(&prefix));
            chunks.extend(pieces.into_iter().filter(|p| !p.is_empty()));
        }
    }
    Ok(chunks)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    pub(crate) fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn splits_several_messages() {
        let mut body = frame(0, b"hello");
        body.extend(frame(0, b""));
        body.extend(frame(1, &gzip(b"world")));
        let messages = split(
            &Bytes::from(body),
            Encoding::Gzip,
            1024,
            false,
            &MessageBudget::unlimited(),
        )
        .unwrap();
        assert_eq!(messages, vec![&b"hello"[..], b"", b"world"]);
    }

    #[test]
    fn round_trips_through_encode() {
        let chunks = encode(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")]).unwrap();
        let body = join(chunks, 15);
        let messages = split(
            &body,
            Encoding::Identity,
            1024,
            false,
            &MessageBudget::unlimited(),
        )
        .unwrap();
        assert_eq!(messages, vec![&b"abc"[..], b"de"]);
    }

    #[test]
    fn no_chunk_is_empty_and_small_messages_share_their_prefix_chunk() {
        let big = Bytes::from(vec![7u8; COALESCE_MAX + 1]);
        let chunks = encode(vec![Bytes::new(), Bytes::from_static(b"ab"), big.clone()]).unwrap();
        assert!(chunks.iter().all(|c| !c.is_empty()));
        assert_eq!(chunks[0], &[0, 0, 0, 0, 0][..]);
        assert_eq!(chunks[1], &[0, 0, 0, 0, 2, b'a', b'b'][..]);
        assert_eq!(chunks[3], big, "a large message is passed on, not copied");
    }

    #[test]
    fn truncated_prefix_and_message_are_errors() {
        assert!(matches!(
            split(
                &Bytes::from_static(&[0, 0, 0]),
                Encoding::Identity,
                10,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::Truncated { .. })
        ));
        let mut body = frame(0, b"hello");
        body.truncate(7);
        assert!(matches!(
            split(
                &Bytes::from(body),
                Encoding::Identity,
                10,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn absurd_length_is_refused_before_reading() {
        let body = Bytes::from(vec![0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            split(
                &body,
                Encoding::Identity,
                1024,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::TooLarge {
                size: u32::MAX as usize,
                limit: 1024
            })
        );
    }

    /// A gzip message that announces its size truthfully (ISIZE) is inflated into one buffer
    /// of exactly that size, charged once; a lying ISIZE only changes where growth starts.
    #[test]
    fn gzip_is_inflated_into_a_buffer_sized_once() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let compressed = gzip(&data);
        let budget = MessageBudget::unlimited();
        let out = inflate(&compressed, Encoding::Gzip, 10 << 20, &budget).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            budget.used(),
            data.len(),
            "charged once, the announced size"
        );
        let mut lying = compressed.clone();
        let n = lying.len();
        lying[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
        let budget = MessageBudget::unlimited();
        // flate2 checks ISIZE against what it inflated: a lie is a corrupt stream.
        assert!(inflate(&lying, Encoding::Gzip, 10 << 20, &budget).is_err());
        assert!(budget.used() <= 2 * data.len());
    }

    #[test]
    fn gzip_bomb_is_bounded() {
        let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
        let body = Bytes::from(frame(1, &bomb));
        assert!(matches!(
            split(
                &body,
                Encoding::Gzip,
                1024 * 1024,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_flag_and_unknown_encoding_are_errors() {
        assert_eq!(
            split(
                &Bytes::from(frame(7, b"x")),
                Encoding::Identity,
                10,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::InvalidFlag(7))
        );
        assert!(matches!(
            Encoding::from_header(Some("snappy")),
            Err(FrameError::UnsupportedEncoding(_))
        ));
        assert!(matches!(
            split(
                &Bytes::from(frame(1, b"x")),
                Encoding::Identity,
                10,
                false,
                &MessageBudget::unlimited()
            ),
            Err(FrameError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn unary_body_with_a_second_message_is_refused_before_inflating_it() {
        let bomb = gzip(&vec![0u8; 4 * 1024 * 1024]);
        let mut body = frame(0, b"first");
        body.extend(frame(1, &bomb));
        let budget = MessageBudget::unlimited();
        assert_eq!(
            split(&Bytes::from(body), Encoding::Gzip, 8 << 20, true, &budget),
            Err(FrameError::NotUnary)
        );
        assert_eq!(budget.used(), 0, "the second message was never inflated");
    }

    #[test]
    fn every_gzip_member_is_read_and_trailing_bytes_refused() {
        let mut two = gzip(b"first ");
        two.extend(gzip(b"second"));
        let budget = MessageBudget::unlimited();
        let messages = split(
            &Bytes::from(frame(1, &two)),
            Encoding::Gzip,
            1024,
            true,
            &budget,
        );
        assert_eq!(messages.unwrap(), vec![&b"first second"[..]]);
        let mut trailing = gzip(b"first");
        trailing.extend_from_slice(b"\x0a\x01B");
        let err = split(
            &Bytes::from(frame(1, &trailing)),
            Encoding::Gzip,
            1024,
            true,
            &budget,
        );
        assert!(matches!(err, Err(FrameError::Corrupt { .. })), "{err:?}");
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(b"first").unwrap();
        let mut zlib = zlib.finish().unwrap();
        zlib.extend_from_slice(b"\x0a\x01B");
        let err = split(
            &Bytes::from(frame(1, &zlib)),
            Encoding::Deflate,
            1024,
            true,
            &budget,
        );
        assert!(matches!(err, Err(FrameError::Corrupt { .. })), "{err:?}");
    }

    #[test]
    fn an_empty_compressed_message_is_refused() {
        let err = split(
            &Bytes::from(frame(1, b"")),
            Encoding::Gzip,
            1024,
            true,
            &MessageBudget::unlimited(),
        );
        assert!(matches!(err, Err(FrameError::Corrupt { .. })), "{err:?}");
    }

    #[test]
    fn inflation_draws_from_the_message_budget() {
        use crate::budget::ProcessBudget;
        let mut body = Vec::new();
        for _ in 0..4 {
            body.extend(frame(1, &gzip(&vec![1u8; 1024 * 1024])));
        }
        let budget = MessageBudget::new(ProcessBudget::unlimited(), 3 * 1024 * 1024);
        let err = split(&Bytes::from(body), Encoding::Gzip, 8 << 20, false, &budget).unwrap_err();
        assert!(
            matches!(err, FrameError::Budget(Exhausted::Message { .. })),
            "{err}"
        );
        assert!(budget.used() <= 3 * 1024 * 1024);
    }
}
