//! zstd with reused per-thread contexts, compressing into a caller's buffer and decompressing
//! with a hard output bound.

use std::cell::RefCell;

use zstd::zstd_safe::{
    self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective,
    zstd_sys::ZSTD_EndDirective,
};

use super::CodecError;
use crate::budget::MessageBudget;
use crate::buffers::PooledBuf;

thread_local! {
    static CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

fn zstd_error(code: usize) -> String {
    zstd_safe::get_error_name(code).to_owned()
}

/// Appends one zstd frame of `src` (content size recorded) to `buf`.
pub(crate) fn compress_into(buf: &mut Vec<u8>, src: &[u8], level: i32) -> Result<(), CodecError> {
    buf.reserve(zstd_safe::compress_bound(src.len()));
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cctx = slot.get_or_insert_with(CCtx::create);
        let err = |c| CodecError::Compress(zstd_error(c));
        cctx.reset(ResetDirective::SessionAndParameters)
            .map_err(err)?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .map_err(err)?;
        cctx.set_pledged_src_size(Some(src.len() as u64))
            .map_err(err)?;
        let pos = buf.len();
        let mut out = OutBuffer::around_pos(buf, pos);
        let mut input = InBuffer::around(src);
        loop {
            let remaining = cctx
                .compress_stream2(&mut out, &mut input, ZSTD_EndDirective::ZSTD_e_end)
                .map_err(err)?;
            if remaining == 0 {
                return Ok(());
            }
            if out.pos() == out.capacity() {
                // Cannot happen with compress_bound() of room; never loop forever.
                return Err(CodecError::Compress("output buffer exhausted".to_owned()));
            }
        }
    })
}

/// Payloads of at least this many bytes are sampled before they are compressed.
pub(crate) const SAMPLE_FROM: usize = 1024 * 1024;

/// The size of each sample.
const SAMPLE_LEN: usize = 16 * 1024;

/// Whether compressing `src` can pay: `true` below [`SAMPLE_FROM`] (the whole attempt is
/// cheap), else whether any of three samples (start, middle, end; [`SAMPLE_LEN`] each) shrinks
/// by at least 1/32 at `level`. Incompressible artifacts (already compressed, encrypted,
/// random) then skip a whole-payload pass that would be thrown away (about 0.1 s of CPU per
/// 48 MiB); data that shrinks anywhere sampled is compressed whole, as before.
pub(crate) fn worth_compressing(src: &[u8], level: i32) -> Result<bool, CodecError> {
    if src.len() < SAMPLE_FROM {
        return Ok(true);
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(SAMPLE_LEN));
    let middle = src.len() / 2 - SAMPLE_LEN / 2;
    for start in [0, middle, src.len() - SAMPLE_LEN] {
        out.clear();
        compress_into(&mut out, &src[start..start + SAMPLE_LEN], level)?;
        if out.len() < SAMPLE_LEN - SAMPLE_LEN / 32 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The largest window (log2) a frame may ask for: the limit's next power of two, but at least
/// 8 MiB (streaming encoders that do not know the input size use such windows even for small
/// inputs) and at most zstd's default maximum of 128 MiB. A frame asking for more is refused
/// before zstd allocates the window.
fn window_log_max(limit: usize) -> u32 {
    let log = usize::BITS - limit.saturating_sub(1).leading_zeros();
    log.clamp(23, 27)
}

/// Decompresses `frame` (one or more zstd frames) into at most `limit` bytes.
///
/// The output grows geometrically up to `limit` (a pooled buffer may have room past it: any
/// byte written past `limit` is refused at once); a frame whose header
/// declares more than `limit`, or that produces one byte more, is refused. zstd's own window
/// buffer is capped by [`window_log_max`], so memory stays below `limit` plus that window.
/// Every byte of output capacity is charged to `budget` before it is written.
pub(crate) fn decompress_bounded(
    frame: &[u8],
    limit: usize,
    budget: &MessageBudget,
) -> Result<PooledBuf, CodecError> {
    if frame.is_empty() {
        return Err(CodecError::CorruptFrame("empty".to_owned()));
    }
    let too_large = || CodecError::DecompressedTooLarge { limit };
    let corrupt = |c: usize| {
        CodecError::CorruptFrame(match zstd_error(c) {
            e if e.contains("too much memory") => {
                format!("{e} (window larger than 2^{} bytes)", window_log_max(limit))
            }
            e => e,
        })
    };
    let (initial, declared) = match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n > limit as u64 => return Err(too_large()),
        Ok(Some(n)) => (n as usize, true),
        Ok(None) => (
            frame.len().saturating_mul(4).clamp(64 * 1024, limit.max(1)),
            false,
        ),
        Err(_) => {
            return Err(CodecError::CorruptFrame("invalid frame header".to_owned()));
        }
    };
    // A pooled buffer may be up to a size class larger than asked for; what it holds is
    // charged before anything is written (a new mapping untouched costs no memory yet).
    let mut out = PooledBuf::with_capacity(initial.min(limit));
    budget.charge(out.capacity())?;
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = slot.get_or_insert_with(DCtx::create);
        if declared {
            // Fast path: one-shot into exactly the declared size (≤ limit). zstd cannot write
            // past the buffer, needs no window buffer, and any surprise (more frames, a lying
            // header) falls back to the streaming path below for a precise error.
            if dctx.decompress(&mut *out, frame).is_ok() && out.len() <= limit {
                return Ok(());
            }
            out.clear();
        }
        dctx.reset(ResetDirective::SessionAndParameters)
            .map_err(corrupt)?;
        dctx.set_parameter(DParameter::WindowLogMax(window_log_max(limit)))
            .map_err(corrupt)?;
        let mut input = InBuffer::around(frame);
        loop {
            let before = (input.pos(), out.len());
            let hint = if out.len() == out.capacity() && out.len() >= limit {
                // At the limit: any further byte of output means the frame is too large.
                let mut probe = [0u8; 1];
                let mut p = OutBuffer::around(&mut probe[..]);
                let hint = dctx
                    .decompress_stream(&mut p, &mut input)
                    .map_err(corrupt)?;
                if p.pos() > 0 {
                    return Err(too_large());
                }
                hint
            } else {
                if out.len() == out.capacity() {
                    let grow = out.capacity().max(64 * 1024).min(limit - out.len());
                    budget.charge(grow)?;
                    out.reserve_exact(grow);
                }
                let pos = out.len();
                let mut o = OutBuffer::around_pos(&mut *out, pos);
                dctx.decompress_stream(&mut o, &mut input)
                    .map_err(corrupt)?
            };
            if out.len() > limit {
                return Err(too_large());
            }
            if hint == 0 && input.pos() == frame.len() {
                return Ok(());
            }
            if (input.pos(), out.len()) == before {
                return Err(CodecError::CorruptFrame(if input.pos() == frame.len() {
                    "truncated frame".to_owned()
                } else {
                    "decoder made no progress".to_owned()
                }));
            }
        }
    })?;
    Ok(out)
}
