//! The error type of the walker.

/// Why a message could not be walked or spliced.
///
/// Every wire-level variant carries the absolute byte `offset` in the walked buffer and the
/// dotted field `path` of the message being read when the problem was found (empty at the
/// top level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The buffer ended in the middle of a tag, a varint or a fixed-width value.
    #[error("truncated data at offset {offset} (in `{path}`)")]
    Truncated {
        /// Byte offset where more data was needed.
        offset: usize,
        /// Field path of the enclosing message.
        path: String,
    },
    /// A varint longer than 10 bytes or overflowing 64 bits.
    #[error("malformed varint at offset {offset} (in `{path}`)")]
    BadVarint {
        /// Byte offset of the varint's first byte.
        offset: usize,
        /// Field path of the enclosing message.
        path: String,
    },
    /// A tag with wire type 6 or 7, field number 0, or an unmatched end-group.
    #[error("invalid tag (wire type {wire_type}, field {field}) at offset {offset} (in `{path}`)")]
    InvalidWireType {
        /// The wire type found.
        wire_type: u8,
        /// The field number found.
        field: u32,
        /// Byte offset of the tag.
        offset: usize,
        /// Field path of the enclosing message.
        path: String,
    },
    /// A payload-bearing message field that is not length-delimited on the wire.
    #[error(
        "field {field} should be length-delimited but has wire type {wire_type} at offset {offset} (in `{path}`)"
    )]
    UnexpectedWireType {
        /// The wire type found.
        wire_type: u8,
        /// The field number.
        field: u32,
        /// Byte offset of the tag.
        offset: usize,
        /// Field path of the enclosing message.
        path: String,
    },
    /// A length prefix pointing past the end of the enclosing message.
    #[error(
        "length {len} at offset {offset} runs past the end of the enclosing message (in `{path}`)"
    )]
    LengthOutOfBounds {
        /// The declared length.
        len: u64,
        /// Byte offset of the length prefix.
        offset: usize,
        /// Field path of the enclosing message.
        path: String,
    },
    /// Messages (or groups) nested deeper than [`MAX_DEPTH`](crate::MAX_DEPTH).
    #[error("nesting deeper than {limit} levels at offset {offset} (in `{path}`)")]
    TooDeep {
        /// The limit, [`MAX_DEPTH`](crate::MAX_DEPTH).
        limit: usize,
        /// Byte offset of the message that would exceed the limit.
        offset: usize,
        /// Field path of the too-deep message.
        path: String,
    },
    /// `Scan::splice` was given the wrong number of replacements.
    #[error("expected {expected} replacements (one per site), got {got}")]
    ReplacementCount {
        /// Number of sites in the scan.
        expected: usize,
        /// Number of replacements given.
        got: usize,
    },
    /// `Scan::splice` was given a buffer of a different length than the scanned one.
    #[error("splice input is {got} bytes but the scanned message was {expected} bytes")]
    InputMismatch {
        /// Length of the scanned buffer.
        expected: usize,
        /// Length of the buffer given to splice.
        got: usize,
    },
    /// `Scan::splice_with` was given the wrong number of failure edits.
    #[error("expected {expected} failure edits (one per failure site), got {got}")]
    EditCount {
        /// Number of failure sites in the scan.
        expected: usize,
        /// Number of edits given.
        got: usize,
    },
    /// A failure edit does not fit the failure (sealing a failure that already has
    /// `encoded_attributes` or has nothing to seal; restoring one without attributes).
    #[error("failure edit {index}: {reason}")]
    BadEdit {
        /// Index of the failure site.
        index: usize,
        /// What does not fit.
        reason: &'static str,
    },
    /// Two replacements or edits overlap without one containing the other.
    #[error("overlapping edits at offset {offset}")]
    OverlappingEdits {
        /// Where the second one starts.
        offset: usize,
    },
}

impl WalkError {
    /// The byte offset where the problem was found, for wire-level errors.
    pub fn offset(&self) -> Option<usize> {
        match self {
            WalkError::Truncated { offset, .. }
            | WalkError::BadVarint { offset, .. }
            | WalkError::InvalidWireType { offset, .. }
            | WalkError::UnexpectedWireType { offset, .. }
            | WalkError::LengthOutOfBounds { offset, .. }
            | WalkError::TooDeep { offset, .. } => Some(*offset),
            WalkError::ReplacementCount { .. }
            | WalkError::InputMismatch { .. }
            | WalkError::EditCount { .. }
            | WalkError::BadEdit { .. }
            | WalkError::OverlappingEdits { .. } => None,
        }
    }

    /// The dotted field path where the problem was found, for wire-level errors.
    pub fn path(&self) -> Option<&str> {
        match self {
            WalkError::Truncated { path, .. }
            | WalkError::BadVarint { path, .. }
            | WalkError::InvalidWireType { path, .. }
            | WalkError::UnexpectedWireType { path, .. }
            | WalkError::LengthOutOfBounds { path, .. }
            | WalkError::TooDeep { path, .. } => Some(path),
            WalkError::ReplacementCount { .. }
            | WalkError::InputMismatch { .. }
            | WalkError::EditCount { .. }
            | WalkError::BadEdit { .. }
            | WalkError::OverlappingEdits { .. } => None,
        }
    }
}
