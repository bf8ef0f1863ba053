//! Protobuf wire-format primitives: varints, tags, and skipping fields.
//!
//! These work on a buffer plus an explicit `end` bound (the end of the enclosing message)
//! and report problems as a lightweight [`Fault`]; the walker adds the field path.

/// Wire type: varint.
pub(crate) const VARINT: u8 = 0;
/// Wire type: 64-bit fixed.
pub(crate) const I64: u8 = 1;
/// Wire type: length-delimited.
pub(crate) const LEN: u8 = 2;
/// Wire type: start group (deprecated).
pub(crate) const SGROUP: u8 = 3;
/// Wire type: end group (deprecated).
pub(crate) const EGROUP: u8 = 4;
/// Wire type: 32-bit fixed.
pub(crate) const I32: u8 = 5;

/// What went wrong at the wire level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultKind {
    Truncated,
    BadVarint,
    InvalidTag { wire_type: u8, field: u32 },
    UnexpectedWireType { wire_type: u8, field: u32 },
    LengthOutOfBounds { len: u64 },
    TooDeep,
}

/// A wire-level problem at an absolute offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    pub(crate) offset: usize,
}

impl Fault {
    #[inline]
    pub(crate) fn new(kind: FaultKind, offset: usize) -> Fault {
        Fault { kind, offset }
    }
}

/// Reads a varint at `*pos` (not past `end`), advancing `*pos`.
#[inline]
pub(crate) fn read_varint(buf: &[u8], pos: &mut usize, end: usize) -> Result<u64, Fault> {
    let start = *pos;
    // Fast path: one byte.
    if start < end {
        let b = buf[start];
        if b < 0x80 {
            *pos = start + 1;
            return Ok(u64::from(b));
        }
    }
    let mut value: u64 = 0;
    let mut i = start;
    for shift in 0..10u32 {
        if i >= end {
            return Err(Fault::new(FaultKind::Truncated, start));
        }
        let b = buf[i];
        i += 1;
        if shift == 9 && b > 1 {
            return Err(Fault::new(FaultKind::BadVarint, start));
        }
        value |= u64::from(b & 0x7f) << (shift * 7);
        if b < 0x80 {
            *pos = i;
            return Ok(value);
        }
    }
    Err(Fault::new(FaultKind::BadVarint, start))
}

/// Reads a tag, returning `(field number, wire type)`. Rejects field 0, field numbers above
/// `u32`, and wire types 6 and 7.
#[inline]
pub(crate) fn read_tag(buf: &[u8], pos: &mut usize, end: usize) -> Result<(u32, u8), Fault> {
    let start = *pos;
    let tag = read_varint(buf, pos, end)?;
    let wire_type = (tag & 7) as u8;
    let field = tag >> 3;
    if field == 0 || field > u64::from(u32::MAX) || wire_type > I32 {
        return Err(Fault::new(
            FaultKind::InvalidTag {
                wire_type,
                field: field.min(u64::from(u32::MAX)) as u32,
            },
            start,
        ));
    }
    Ok((field as u32, wire_type))
}

/// Reads a length prefix at `*pos` and returns the value range `(start, end)` it delimits,
/// advancing `*pos` past the value.
#[inline]
pub(crate) fn read_len(buf: &[u8], pos: &mut usize, end: usize) -> Result<(usize, usize), Fault> {
    let at = *pos;
    let len = read_varint(buf, pos, end)?;
    let avail = (end - *pos) as u64;
    if len > avail {
        return Err(Fault::new(FaultKind::LengthOutOfBounds { len }, at));
    }
    let vstart = *pos;
    let vend = vstart + len as usize;
    *pos = vend;
    Ok((vstart, vend))
}

/// Skips the value of a field with the given wire type (the tag has been read).
/// Groups are skipped up to their matching end-group, at most `depth_left` levels deep.
pub(crate) fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    end: usize,
    field: u32,
    wire_type: u8,
    tag_offset: usize,
    depth_left: usize,
) -> Result<(), Fault> {
    match wire_type {
        VARINT => {
            read_varint(buf, pos, end)?;
        }
        I64 => {
            if end - *pos < 8 {
                return Err(Fault::new(FaultKind::Truncated, *pos));
            }
            *pos += 8;
        }
        LEN => {
            read_len(buf, pos, end)?;
        }
        I32 => {
            if end - *pos < 4 {
                return Err(Fault::new(FaultKind::Truncated, *pos));
            }
            *pos += 4;
        }
        SGROUP => {
            if depth_left == 0 {
                return Err(Fault::new(FaultKind::TooDeep, tag_offset));
            }
            loop {
                if *pos >= end {
                    return Err(Fault::new(FaultKind::Truncated, *pos));
                }
                let at = *pos;
                let (f, wt) = read_tag(buf, pos, end)?;
                if wt == EGROUP {
                    if f != field {
                        return Err(Fault::new(
                            FaultKind::InvalidTag {
                                wire_type: wt,
                                field: f,
                            },
                            at,
                        ));
                    }
                    return Ok(());
                }
                skip_value(buf, pos, end, f, wt, at, depth_left - 1)?;
            }
        }
        _ => {
            // A stray end-group (or anything else) outside a group.
            return Err(Fault::new(
                FaultKind::InvalidTag { wire_type, field },
                tag_offset,
            ));
        }
    }
    Ok(())
}

/// Length of the canonical varint encoding of `value`.
#[inline]
pub(crate) fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends `value` as a canonical varint.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        let mut out = Vec::new();
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            out.clear();
            put_varint(&mut out, v);
            assert_eq!(varint_len(v), out.len());
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos, out.len()), Ok(v));
            assert_eq!(pos, out.len());
        }
        // Non-canonical (overlong) varints are accepted.
        let mut pos = 0;
        assert_eq!(read_varint(&[0x81, 0x80, 0x00], &mut pos, 3), Ok(1));
        // 11 bytes / overflow / truncation are rejected.
        let mut pos = 0;
        assert!(read_varint(&[0xff; 11], &mut pos, 11).is_err());
        let mut pos = 0;
        assert!(read_varint(&[0x80], &mut pos, 1).is_err());
    }
}
