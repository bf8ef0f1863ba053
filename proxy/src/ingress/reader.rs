//! A request body's gRPC frames read as its chunks arrive: plain messages are copied into a
//! buffer sized from their prefix (or kept as a slice of the chunk that holds them whole),
//! compressed ones are fed chunk by chunk to the inflater, so inflation overlaps arrival and
//! each compressed chunk is freed once it is consumed. What the body holds at any time is the
//! messages read so far plus the chunk in hand, never the compressed message beside its
//! inflation.
//!
//! The rules are those of [`frame::split`](crate::grpc::frame::split), which reads a whole
//! body the same way, with the same errors: a prefix announcing more than the limit is
//! refused before anything of the message is read; a unary call's second frame is refused at
//! its first byte; every gzip member is read, CRC-32 and `ISIZE` checked, anything after the
//! last member that is not another member refused; a zlib stream's Adler-32 is checked and
//! bytes after it refused; an empty compressed message is refused; the inflated size is
//! bounded by the message limit *while* inflating (every byte of output capacity is charged
//! to the message budget before it is allocated, and a stream is refused at the first byte
//! past the limit: a gzip bomb costs the limit, not its expansion).
//!
//! The inflated size is not known before the end (gzip's `ISIZE` is in the trailer), so the
//! output starts at the compressed length (deflate never makes real data larger by more than
//! its block framing: incompressible data fits as it is), within the limit, and doubles when
//! full. Past glibc's mmap threshold (fixed at 128 KiB by [`crate::alloc`]) each growth is a
//! `mremap`, not a copy (BENCHMARKS.md, issue 24, "Hash on arrival and streaming inflate").

use bytes::Bytes;
use flate2::{Crc, Decompress, FlushDecompress, Status};

use crate::budget::MessageBudget;
use crate::buffers::PooledBuf;
use crate::grpc::frame::{Encoding, FrameError, PREFIX_LEN};

/// The smallest output buffer of a compressed message (as [`frame::split`] reserves).
///
/// [`frame::split`]: crate::grpc::frame::split
const MIN_OUTPUT: usize = 64 * 1024;

/// gRPC frames read from body chunks as they arrive. [`push`](Self::push) each data chunk in
/// order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct FrameReader {
    encoding: Encoding,
    /// The largest message, on the wire and inflated.
    limit: usize,
    /// One message at most: a second frame is refused at its first byte.
    unary: bool,
    budget: MessageBudget,
    state: State,
    messages: Vec<Bytes>,
}

#[derive(Debug)]
enum State {
    /// Reading a prefix; `have` of its bytes are in `bytes`.
    Prefix {
        bytes: [u8; PREFIX_LEN],
        have: usize,
    },
    /// Copying a plain message that spans chunks: `left` bytes still to come.
    Plain { out: PooledBuf, left: usize },
    /// Inflating a compressed message: `left` compressed bytes still to come.
    Compressed {
        inflater: Box<Inflater>,
        len: usize,
        left: usize,
    },
}

impl State {
    fn prefix() -> Self {
        State::Prefix {
            bytes: [0; PREFIX_LEN],
            have: 0,
        }
    }
}

impl FrameReader {
    /// A reader of messages of at most `limit` bytes (on the wire and inflated) compressed
    /// per `encoding`, charging what it keeps to `budget`.
    pub fn new(encoding: Encoding, limit: usize, unary: bool, budget: MessageBudget) -> Self {
        Self {
            encoding,
            limit,
            unary,
            budget,
            state: State::prefix(),
            messages: Vec::new(),
        }
    }

    /// Reads the next chunk of the body. An error is final: the request is refused.
    pub fn push(&mut self, chunk: Bytes) -> Result<(), FrameError> {
        let mut at = 0;
        while at < chunk.len() {
            let rest = &chunk[at..];
            match &mut self.state {
                State::Prefix { bytes, have } => {
                    if *have == 0 && self.unary && !self.messages.is_empty() {
                        return Err(FrameError::NotUnary);
                    }
                    let n = (PREFIX_LEN - *have).min(rest.len());
                    bytes[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    at += n;
                    if *have == PREFIX_LEN {
                        let bytes = *bytes;
                        self.start_message(bytes, &chunk, at)?;
                        if let State::Plain { left: 0, .. } = self.state {
                            // The whole message was in this chunk: kept as a slice of it.
                            let len = self.announced(bytes);
                            self.messages.push(chunk.slice(at..at + len));
                            at += len;
                            self.state = State::prefix();
                        }
                    }
                }
                State::Plain { out, left } => {
                    let n = (*left).min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    *left -= n;
                    at += n;
                    if *left == 0 {
                        let out = std::mem::take(out);
                        self.messages.push(out.freeze());
                        self.state = State::prefix();
                    }
                }
                State::Compressed {
                    inflater,
                    len,
                    left,
                } => {
                    let n = (*left).min(rest.len());
                    inflater.feed(&rest[..n], *len)?;
                    *left -= n;
                    at += n;
                    if *left == 0 {
                        let State::Compressed { inflater, .. } =
                            std::mem::replace(&mut self.state, State::prefix())
                        else {
                            unreachable!("matched above")
                        };
                        self.messages.push(inflater.finish()?);
                    }
                }
            }
        }
        Ok(())
    }

    fn announced(&self, prefix: [u8; PREFIX_LEN]) -> usize {
        u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize
    }

    /// A prefix is complete; the message starts at `chunk[at..]`. A plain message held whole
    /// by the chunk is left as `Plain { left: 0 }` for the caller to slice.
    fn start_message(
        &mut self,
        prefix: [u8; PREFIX_LEN],
        chunk: &Bytes,
        at: usize,
    ) -> Result<(), FrameError> {
        let len = self.announced(prefix);
        if len > self.limit {
            return Err(FrameError::TooLarge {
                size: len,
                limit: self.limit,
            });
        }
        self.state = match prefix[0] {
            0 => {
                self.budget.hold(len)?;
                if chunk.len() - at >= len {
                    State::Plain {
                        out: PooledBuf::default(),
                        left: 0,
                    }
                } else {
                    State::Plain {
                        out: PooledBuf::with_capacity(len),
                        left: len,
                    }
                }
            }
            1 => State::Compressed {
                inflater: Box::new(Inflater::new(
                    self.encoding,
                    len,
                    self.limit,
                    self.budget.clone(),
                )?),
                len,
                left: len,
            },
            other => return Err(FrameError::InvalidFlag(other)),
        };
        Ok(())
    }

    /// The messages, once the body has ended: an end inside a prefix or a message is
    /// [`FrameError::Truncated`].
    pub fn finish(self) -> Result<Vec<Bytes>, FrameError> {
        match self.state {
            State::Prefix { have: 0, .. } => Ok(self.messages),
            State::Prefix { have, .. } => Err(FrameError::Truncated {
                needed: PREFIX_LEN,
                available: have,
            }),
            State::Plain { out, left } => Err(FrameError::Truncated {
                needed: out.len() + left,
                available: out.len(),
            }),
            State::Compressed { len, left, .. } => Err(FrameError::Truncated {
                needed: len,
                available: len - left,
            }),
        }
    }
}

/// Where a gzip stream is.
#[derive(Debug)]
enum Gzip {
    /// In a member's header.
    Header(GzipHeader),
    /// In a member's deflate data; `crc` of what it inflated so far, which starts at
    /// `start` in the output.
    Body { crc: Crc, start: usize },
    /// In a member's trailer (CRC-32, ISIZE); `have` bytes of it are in `bytes`.
    Trailer {
        crc: Crc,
        size: usize,
        bytes: [u8; 8],
        have: usize,
    },
    /// After a complete member: the end, or the next member's header.
    Between,
}

/// One compressed message inflated from its pieces as they arrive, into one output buffer.
pub struct Inflater {
    name: &'static str,
    raw: Decompress,
    /// `None` for zlib (`deflate`), whose checks the decompressor makes itself.
    gzip: Option<Gzip>,
    /// zlib only: the stream has ended; any byte after it is refused.
    ended: bool,
    /// Compressed bytes consumed so far.
    consumed: usize,
    out: Vec<u8>,
    /// The capacity of the output's next growth.
    next: usize,
    limit: usize,
    budget: MessageBudget,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("encoding", &self.name)
            .field("consumed", &self.consumed)
            .field("out", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Inflater {
    /// An inflater of one message of `compressed` bytes per `encoding`, producing at most
    /// `limit` bytes. An empty compressed message, or one without an encoding, is refused.
    pub fn new(
        encoding: Encoding,
        compressed: usize,
        limit: usize,
        budget: MessageBudget,
    ) -> Result<Self, FrameError> {
        let (name, raw, gzip) = match encoding {
            Encoding::Gzip => (
                "gzip",
                Decompress::new(false),
                Some(Gzip::Header(GzipHeader::default())),
            ),
            Encoding::Deflate => ("deflate", Decompress::new(true), None),
            Encoding::Identity => {
                return Err(FrameError::UnsupportedEncoding(
                    "compressed message without grpc-encoding".to_owned(),
                ));
            }
        };
        if compressed == 0 {
            return Err(FrameError::Corrupt {
                encoding: name,
                reason: "empty compressed message".to_owned(),
            });
        }
        Ok(Self {
            name,
            raw,
            gzip,
            ended: false,
            consumed: 0,
            out: Vec::new(),
            next: compressed.max(MIN_OUTPUT).min(limit.max(1)),
            limit,
            budget,
        })
    }

    fn corrupt(&self, reason: impl Into<String>) -> FrameError {
        FrameError::Corrupt {
            encoding: self.name,
            reason: reason.into(),
        }
    }

    /// Inflates the next piece of the message; `total` is the whole compressed length.
    pub fn feed(&mut self, mut input: &[u8], total: usize) -> Result<(), FrameError> {
        while !input.is_empty() {
            let Some(gzip) = self.gzip.take() else {
                // zlib: one stream, nothing after it.
                if self.ended {
                    return Err(self.corrupt(format!(
                        "{} bytes after the end of the compressed stream",
                        total - self.consumed
                    )));
                }
                let (used, ended) = self.inflate(input, None)?;
                self.consumed += used;
                input = &input[used..];
                self.ended = ended;
                continue;
            };
            let next = match gzip {
                Gzip::Header(mut header) => {
                    let used = header.feed(input).map_err(|why| self.corrupt(why))?;
                    self.consumed += used;
                    input = &input[used..];
                    if header.done() {
                        self.raw.reset(false);
                        Gzip::Body {
                            crc: Crc::new(),
                            start: self.out.len(),
                        }
                    } else {
                        Gzip::Header(header)
                    }
                }
                Gzip::Body { mut crc, start } => {
                    let (used, ended) = self.inflate(input, Some(&mut crc))?;
                    self.consumed += used;
                    input = &input[used..];
                    if ended {
                        Gzip::Trailer {
                            crc,
                            size: self.out.len() - start,
                            bytes: [0; 8],
                            have: 0,
                        }
                    } else {
                        Gzip::Body { crc, start }
                    }
                }
                Gzip::Trailer {
                    crc,
                    size,
                    mut bytes,
                    mut have,
                } => {
                    let n = (8 - have).min(input.len());
                    bytes[have..have + n].copy_from_slice(&input[..n]);
                    have += n;
                    self.consumed += n;
                    input = &input[n..];
                    if have < 8 {
                        Gzip::Trailer {
                            crc,
                            size,
                            bytes,
                            have,
                        }
                    } else {
                        let sum = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                        let isize = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                        if sum != crc.sum() || isize != size as u32 {
                            return Err(self
                                .corrupt("corrupt gzip stream does not have a matching checksum"));
                        }
                        Gzip::Between
                    }
                }
                // More bytes after a member: they must be another member.
                Gzip::Between => Gzip::Header(GzipHeader::default()),
            };
            self.gzip = Some(next);
        }
        Ok(())
    }

    /// Inflates from `input` into the output until the input is used up or the stream
    /// ends; returns the input bytes used and whether the stream ended. The output grows
    /// only when the stream has more for it (a probe of one byte), within the limit, each
    /// growth charged to the budget before it is allocated.
    fn inflate(
        &mut self,
        mut input: &[u8],
        mut crc: Option<&mut Crc>,
    ) -> Result<(usize, bool), FrameError> {
        let mut used = 0;
        loop {
            let (before_in, before_out) = (self.raw.total_in(), self.out.len());
            let status = if self.out.len() == self.out.capacity() {
                // Full (or not started): is there more? Only then is the buffer grown.
                let mut probe = [0u8; 1];
                let before_total = self.raw.total_out();
                let status = self
                    .raw
                    .decompress(input, &mut probe, FlushDecompress::None)
                    .map_err(|e| self.corrupt(e.to_string()))?;
                if self.raw.total_out() > before_total {
                    self.grow(probe[0])?;
                }
                status
            } else {
                self.raw
                    .decompress_vec(input, &mut self.out, FlushDecompress::None)
                    .map_err(|e| self.corrupt(e.to_string()))?
            };
            let consumed = (self.raw.total_in() - before_in) as usize;
            input = &input[consumed..];
            used += consumed;
            if let Some(crc) = crc.as_deref_mut() {
                crc.update(&self.out[before_out..]);
            }
            if status == Status::StreamEnd {
                return Ok((used, true));
            }
            let full = self.out.len() == self.out.capacity();
            if input.is_empty() && !full {
                // Everything given is consumed and the output had room: nothing is pending.
                return Ok((used, false));
            }
            if consumed == 0 && self.out.len() == before_out {
                if input.is_empty() {
                    // A probe found nothing pending: more input is needed.
                    return Ok((used, false));
                }
                return Err(self.corrupt("the decompressor made no progress"));
            }
        }
    }

    /// The output is full and the stream has `byte` for it: grows the buffer (doubling,
    /// within the limit), charged first.
    fn grow(&mut self, byte: u8) -> Result<(), FrameError> {
        if self.out.len() >= self.limit {
            return Err(FrameError::TooLarge {
                size: self.out.len() + 1,
                limit: self.limit,
            });
        }
        let capacity = self.next.min(self.limit).max(self.out.len() + 1);
        self.budget.charge(capacity - self.out.capacity())?;
        self.out.reserve_exact(capacity - self.out.len());
        self.next = capacity.saturating_mul(2);
        self.out.push(byte);
        Ok(())
    }

    /// The inflated message, once every compressed byte was fed: the stream must be
    /// complete (gzip: at least one whole member, trailer checked).
    pub fn finish(mut self) -> Result<Bytes, FrameError> {
        let complete = match &self.gzip {
            None => self.ended,
            Some(Gzip::Between) => true,
            Some(_) => false,
        };
        if !complete {
            return Err(self.corrupt("unexpected end of file"));
        }
        if self.out.capacity() - self.out.len() > MIN_OUTPUT {
            // Past the mmap threshold a shrink is an `mremap`, not a copy.
            self.out.shrink_to_fit();
        }
        Ok(Bytes::from(self.out))
    }
}

/// A gzip member header read piece by piece (RFC 1952, as flate2 reads it): magic, method 8
/// (deflate), no reserved flag, the optional extra field, name and comment, and the header
/// CRC when flagged (checked).
#[derive(Debug, Default)]
pub struct GzipHeader {
    /// Bytes of the 10-byte fixed part read so far.
    fixed: [u8; 10],
    have: usize,
    part: Part,
    flags: u8,
    /// CRC-32 of the header so far, kept when `FHCRC` is set.
    crc: Option<Crc>,
    /// Bytes of the current fixed-size part (XLEN, the header CRC) read so far.
    small: [u8; 2],
    small_have: usize,
    /// Extra-field bytes still to skip.
    extra_left: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Part {
    #[default]
    Fixed,
    Xlen,
    Extra,
    Name,
    Comment,
    HeaderCrc,
    Done,
}

const FHCRC: u8 = 1 << 1;
const FEXTRA: u8 = 1 << 2;
const FNAME: u8 = 1 << 3;
const FCOMMENT: u8 = 1 << 4;
const FRESERVED: u8 = (1 << 5) | (1 << 6) | (1 << 7);

impl GzipHeader {
    /// Whether the whole header has been read.
    pub fn done(&self) -> bool {
        self.part == Part::Done
    }

    fn hash(&mut self, bytes: &[u8]) {
        if let Some(crc) = &mut self.crc {
            crc.update(bytes);
        }
    }

    /// Reads header bytes from `input`; returns how many it used (all of them unless the
    /// header ends inside `input`).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, &'static str> {
        let mut at = 0;
        while self.part != Part::Done && at < input.len() {
            let rest = &input[at..];
            match self.part {
                Part::Fixed => {
                    let n = (10 - self.have).min(rest.len());
                    self.fixed[self.have..self.have + n].copy_from_slice(&rest[..n]);
                    self.have += n;
                    at += n;
                    if self.have == 10 {
                        let f = self.fixed;
                        if f[0] != 0x1f || f[1] != 0x8b || f[2] != 8 || f[3] & FRESERVED != 0 {
                            return Err("invalid gzip header");
                        }
                        self.flags = f[3];
                        if self.flags & FHCRC != 0 {
                            self.crc = Some(Crc::new());
                        }
                        self.hash(&f);
                        self.part = Part::Xlen;
                    }
                }
                Part::Xlen if self.flags & FEXTRA == 0 => self.part = Part::Name,
                Part::Xlen => {
                    let n = (2 - self.small_have).min(rest.len());
                    self.small[self.small_have..self.small_have + n].copy_from_slice(&rest[..n]);
                    self.small_have += n;
                    at += n;
                    if self.small_have == 2 {
                        let xlen = self.small;
                        self.hash(&xlen);
                        self.extra_left = u16::from_le_bytes(xlen) as usize;
                        self.small_have = 0;
                        self.part = Part::Extra;
                    }
                }
                Part::Extra => {
                    let n = self.extra_left.min(rest.len());
                    self.hash(&rest[..n]);
                    self.extra_left -= n;
                    at += n;
                    if self.extra_left == 0 {
                        self.part = Part::Name;
                    }
                }
                Part::Name | Part::Comment => {
                    let (flag, after) = if self.part == Part::Name {
                        (FNAME, Part::Comment)
                    } else {
                        (FCOMMENT, Part::HeaderCrc)
                    };
                    if self.flags & flag == 0 {
                        self.part = after;
                        continue;
                    }
                    // Up to and including the terminating NUL.
                    match rest.iter().position(|&b| b == 0) {
                        Some(end) => {
                            self.hash(&rest[..=end]);
                            at += end + 1;
                            self.part = after;
                        }
                        None => {
                            self.hash(rest);
                            at += rest.len();
                        }
                    }
                }
                Part::HeaderCrc if self.flags & FHCRC == 0 => self.part = Part::Done,
                Part::HeaderCrc => {
                    let n = (2 - self.small_have).min(rest.len());
                    self.small[self.small_have..self.small_have + n].copy_from_slice(&rest[..n]);
                    self.small_have += n;
                    at += n;
                    if self.small_have == 2 {
                        let sum = self.crc.as_ref().map_or(0, Crc::sum) as u16;
                        if u16::from_le_bytes(self.small) != sum {
                            return Err("corrupt gzip stream does not have a matching checksum");
                        }
                        self.part = Part::Done;
                    }
                }
                Part::Done => {}
            }
        }
        // A header whose optional parts are all absent ends with its fixed part.
        if self.part != Part::Done && self.part != Part::Fixed && at == input.len() {
            self.skip_absent();
        }
        Ok(at)
    }

    /// Moves past the optional parts the flags say are absent, so a header that ends exactly
    /// at the end of a piece is complete without another byte.
    fn skip_absent(&mut self) {
        loop {
            let next = match self.part {
                Part::Xlen if self.flags & FEXTRA == 0 => Part::Name,
                Part::Name if self.flags & FNAME == 0 => Part::Comment,
                Part::Comment if self.flags & FCOMMENT == 0 => Part::HeaderCrc,
                Part::HeaderCrc if self.flags & FHCRC == 0 => Part::Done,
                _ => return,
            };
            self.part = next;
        }
    }
}
