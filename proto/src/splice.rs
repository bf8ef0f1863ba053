//! Rebuilding a message with some payloads replaced and some failures edited.

use std::ops::Range;

use bytes::Bytes;

use crate::error::WalkError;
use crate::walk::{
    ENCODED_FAILURE_MESSAGE, FAILURE_ENCODED_ATTRIBUTES, FAILURE_MESSAGE, FAILURE_STACK_TRACE,
    FailureEdit, FailureSite, NO_PARENT, Scan, TextEdit,
};
use crate::wire::{put_varint, varint_len};

impl Scan {
    /// Rebuilds the scanned message with payloads replaced.
    ///
    /// `input` must be the buffer that was scanned; `replacements` has one entry per
    /// [`site`](Scan::sites) (`None` keeps that payload, `Some(bytes)` is the new serialized
    /// Payload message). Only the length prefixes of the replaced payloads' fields and of
    /// their enclosing length-delimited fields are rewritten (as canonical varints, and only
    /// when the length actually changes); every other byte is copied as it came — unknown
    /// fields, unknown enum values, non-canonical varints, field order, duplicate fields.
    /// If every replacement is `None` the result is `input.clone()` (no copy).
    pub fn splice(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
    ) -> Result<Bytes, WalkError> {
        self.splice_into::<Flat>(input, replacements)
            .map(Flat::finish)
    }

    fn splice_into<O: Sink>(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
    ) -> Result<O, WalkError> {
        if replacements.len() != self.sites.len() {
            return Err(WalkError::ReplacementCount {
                expected: self.sites.len(),
                got: replacements.len(),
            });
        }
        if input.len() != self.input_len {
            return Err(WalkError::InputMismatch {
                expected: self.input_len,
                got: input.len(),
            });
        }
        if replacements.iter().all(Option::is_none) {
            return Ok(O::whole(input.clone()));
        }
        // Whole-buffer payload (scan of `Payload` itself): no length prefix to fix.
        if self.nodes.is_empty()
            && self.sites.len() == 1
            && self.sites[0].range() == (0..input.len())
        {
            return Ok(O::whole(
                replacements[0].clone().unwrap_or_else(|| input.clone()),
            ));
        }

        // Length change of every node: seed at the payload fields, then push to parents.
        // Nodes are in pre-order, so a parent always comes before its children.
        let mut delta = vec![0i64; self.nodes.len()];
        let mut grow: i64 = 0;
        for (site, rep) in self.sites.iter().zip(replacements) {
            if let Some(r) = rep {
                let d = r.len() as i64 - site.range().len() as i64;
                delta[site.node as usize] += d;
                grow += d;
            }
        }
        self.propagate_deltas(&mut delta);
        let capacity = (input.len() as i64 + grow.max(0)) as usize + 10 * self.nodes.len().min(64);
        let mut out = O::with_capacity(capacity);
        let mut cursor = 0usize;
        let mut sites = self.sites.iter().zip(replacements).peekable();
        for (n, node) in self.nodes.iter().enumerate() {
            if delta[n] != 0 {
                out.input(input, cursor..node.prefix.0);
                out.varint((node.len as i64 + delta[n]) as u64);
                cursor = node.prefix.1;
            }
            while let Some((site, rep)) = sites.next_if(|(s, _)| s.node as usize == n) {
                if let Some(r) = rep {
                    let range = site.range();
                    out.input(input, cursor..range.start);
                    out.bytes(r);
                    cursor = range.end;
                }
            }
        }
        out.input(input, cursor..input.len());
        Ok(out)
    }
}

/// Where a splice writes the rebuilt message.
trait Sink: Sized {
    /// An empty output for a message of about `capacity` bytes.
    fn with_capacity(capacity: usize) -> Self;
    /// The output is this buffer as it is.
    fn whole(bytes: Bytes) -> Self;
    /// `input[range]`, unchanged.
    fn input(&mut self, input: &Bytes, range: Range<usize>);
    /// New bytes (a replacement payload, rebuilt fields).
    fn bytes(&mut self, bytes: &Bytes);
    /// A rewritten length prefix.
    fn varint(&mut self, value: u64);
}

/// One contiguous buffer, or (`whole`) a buffer taken as it is, with nothing written after.
struct Flat {
    buf: Vec<u8>,
    whole: Option<Bytes>,
}

impl Flat {
    fn finish(self) -> Bytes {
        self.whole.unwrap_or_else(|| Bytes::from(self.buf))
    }
}

impl Sink for Flat {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            whole: None,
        }
    }
    fn whole(bytes: Bytes) -> Self {
        Self {
            buf: Vec::new(),
            whole: Some(bytes),
        }
    }
    fn input(&mut self, input: &Bytes, range: Range<usize>) {
        self.buf.extend_from_slice(&input[range]);
    }
    fn bytes(&mut self, bytes: &Bytes) {
        self.buf.extend_from_slice(bytes);
    }
    fn varint(&mut self, value: u64) {
        put_varint(&mut self.buf, value);
    }
}

/// Replacements of at least this size are shared (a `Bytes` reference), not copied, by
/// [`Scan::splice_edits_chunks`].
pub const SHARE_MIN: usize = 64 * 1024;

/// The rebuilt message as chunks: large replacements are shared, everything between them
/// (unchanged input, small replacements, length prefixes) is copied into buffers of its own.
struct Chunked {
    chunks: Vec<Bytes>,
    small: Vec<u8>,
}

impl Chunked {
    fn flush(&mut self) {
        if !self.small.is_empty() {
            self.chunks
                .push(Bytes::from(std::mem::take(&mut self.small)));
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.flush();
        self.chunks
    }
}

impl Sink for Chunked {
    fn with_capacity(_capacity: usize) -> Self {
        Self {
            chunks: Vec::new(),
            small: Vec::new(),
        }
    }
    fn whole(bytes: Bytes) -> Self {
        Self {
            chunks: vec![bytes],
            small: Vec::new(),
        }
    }
    fn input(&mut self, input: &Bytes, range: Range<usize>) {
        // Copied: a shared stretch would keep the whole input alive for a part of it.
        self.small.extend_from_slice(&input[range]);
    }
    fn bytes(&mut self, bytes: &Bytes) {
        if bytes.len() >= SHARE_MIN {
            self.flush();
            self.chunks.push(bytes.clone());
        } else {
            self.small.extend_from_slice(bytes);
        }
    }
    fn varint(&mut self, value: u64) {
        put_varint(&mut self.small, value);
    }
}

impl Scan {
    /// Pushes each node's length change (seeded at the fields whose bytes changed) up to its
    /// ancestors. A rewritten length prefix may itself change size (canonical varint of the
    /// new length vs. the original bytes), which changes the parent's length too. Nodes are in
    /// pre-order, so walking them backwards visits children before parents.
    fn propagate_deltas(&self, delta: &mut [i64]) {
        for n in (0..self.nodes.len()).rev() {
            let node = &self.nodes[n];
            if let Some(p) = node.parent() {
                let mut d = delta[n];
                if d != 0 {
                    let new_len = (node.len as i64 + d) as u64;
                    d += varint_len(new_len) as i64 - (node.prefix.1 - node.prefix.0) as i64;
                }
                delta[p] += d;
            }
        }
    }
}

/// One byte-range replacement at the top level of a node.
struct Op {
    range: Range<usize>,
    node: u32,
    bytes: Bytes,
}

impl Scan {
    /// Rebuilds the scanned message with payloads replaced (as [`Scan::splice`]) and
    /// failures changed: `edits` has one entry per [`failure`](Scan::failures), `None`
    /// leaving it alone (see [`FailureEdit`] for what the others do).
    ///
    /// Everything the edits and replacements do not touch is copied byte for byte; the
    /// length prefixes of the enclosing fields are fixed up. A replacement for a payload
    /// inside a field an edit removes (the `encoded_attributes` of a restored failure) is
    /// dropped with that field. With no edit this is exactly [`Scan::splice`].
    pub fn splice_with(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
        edits: &[Option<FailureEdit>],
    ) -> Result<Bytes, WalkError> {
        self.splice_edits(input, replacements, edits, &vec![None; self.texts.len()])
    }

    /// [`Scan::splice_with`], and the [failure texts](Scan::failure_texts) changed too:
    /// `texts` has one entry per failure text, `None` leaving it alone (see [`TextEdit`] for
    /// what the others do).
    pub fn splice_edits(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
        edits: &[Option<FailureEdit>],
        texts: &[Option<TextEdit>],
    ) -> Result<Bytes, WalkError> {
        self.splice_edits_into::<Flat>(input, replacements, edits, texts)
            .map(Flat::finish)
    }

    /// [`Scan::splice_edits`] without building one buffer: the message as chunks, in order,
    /// whose concatenation is exactly what `splice_edits` returns. Replacements of at least
    /// [`SHARE_MIN`] bytes are chunks of their own, shared rather than copied (a large decoded
    /// payload is not copied into the message); the bytes between them are copied, so no
    /// chunk keeps the input alive (except the input itself when nothing changes). No chunk
    /// is empty.
    pub fn splice_edits_chunks(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
        edits: &[Option<FailureEdit>],
        texts: &[Option<TextEdit>],
    ) -> Result<Vec<Bytes>, WalkError> {
        let mut chunks = self
            .splice_edits_into::<Chunked>(input, replacements, edits, texts)?
            .finish();
        chunks.retain(|c| !c.is_empty());
        Ok(chunks)
    }

    fn splice_edits_into<O: Sink>(
        &self,
        input: &Bytes,
        replacements: &[Option<Bytes>],
        edits: &[Option<FailureEdit>],
        texts: &[Option<TextEdit>],
    ) -> Result<O, WalkError> {
        if edits.len() != self.failures.len() {
            return Err(WalkError::EditCount {
                expected: self.failures.len(),
                got: edits.len(),
            });
        }
        if texts.len() != self.texts.len() {
            return Err(WalkError::EditCount {
                expected: self.texts.len(),
                got: texts.len(),
            });
        }
        if edits.iter().all(Option::is_none) && texts.iter().all(Option::is_none) {
            return self.splice_into(input, replacements);
        }
        if replacements.len() != self.sites.len() {
            return Err(WalkError::ReplacementCount {
                expected: self.sites.len(),
                got: replacements.len(),
            });
        }
        if input.len() != self.input_len {
            return Err(WalkError::InputMismatch {
                expected: self.input_len,
                got: input.len(),
            });
        }
        let mut ops = Vec::new();
        for (site, rep) in self.sites.iter().zip(replacements) {
            if let Some(r) = rep {
                ops.push(Op {
                    range: site.range(),
                    node: site.node,
                    bytes: r.clone(),
                });
            }
        }
        for (index, (failure, edit)) in self.failures.iter().zip(edits).enumerate() {
            if let Some(edit) = edit {
                failure_ops(failure, edit, &mut ops)
                    .map_err(|reason| WalkError::BadEdit { index, reason })?;
            }
        }
        for (index, (text, new)) in self.texts.iter().zip(texts).enumerate() {
            let Some(new) = new else { continue };
            let mut bytes = Vec::new();
            if !new.text.is_empty() {
                put_len_field(&mut bytes, text.field, new.text.as_bytes());
            }
            if let Some(failure) = &new.failure {
                let Some(field) = text.failure_field else {
                    return Err(WalkError::BadEdit {
                        index,
                        reason: "this text's failure is not a field beside it: none can be added",
                    });
                };
                put_len_field(&mut bytes, field, failure);
            }
            let mut bytes = Some(Bytes::from(bytes));
            for whole in &text.fields {
                ops.push(Op {
                    range: whole.clone(),
                    node: text.node,
                    bytes: bytes.take().unwrap_or_default(),
                });
            }
        }
        // Byte order; at one start the longer range first, so a range inside another one
        // (a payload inside a removed field) comes after it and is dropped.
        ops.sort_by(|a, b| {
            a.range
                .start
                .cmp(&b.range.start)
                .then(b.range.end.cmp(&a.range.end))
        });
        let mut kept: Vec<Op> = Vec::with_capacity(ops.len());
        for op in ops {
            // An empty payload right at the end of a replaced range had its field (tag and
            // length prefix) inside that range: it goes with it.
            if let Some(last) = kept.last()
                && (op.range.start < last.range.end
                    || (op.range.is_empty() && op.range.start == last.range.end))
            {
                if op.range.end <= last.range.end {
                    continue;
                }
                return Err(WalkError::OverlappingEdits {
                    offset: op.range.start,
                });
            }
            kept.push(op);
        }

        // Length changes, as in `splice`. Nodes inside a replaced range have no kept op
        // below them, so their delta stays 0 and they are never written.
        let mut delta = vec![0i64; self.nodes.len()];
        for op in &kept {
            if op.node != NO_PARENT {
                delta[op.node as usize] += op.bytes.len() as i64 - op.range.len() as i64;
            }
        }
        self.propagate_deltas(&mut delta);
        // Merge the length-prefix rewrites and the ops in byte order.
        enum Piece<'a> {
            Prefix(u64),
            Bytes(&'a Bytes),
        }
        let mut pieces: Vec<(Range<usize>, Piece<'_>)> = self
            .nodes
            .iter()
            .zip(&delta)
            .filter(|(_, d)| **d != 0)
            .map(|(node, d)| {
                (
                    node.prefix.0..node.prefix.1,
                    Piece::Prefix((node.len as i64 + d) as u64),
                )
            })
            .chain(
                kept.iter()
                    .map(|op| (op.range.clone(), Piece::Bytes(&op.bytes))),
            )
            .collect();
        pieces.sort_by_key(|(r, _)| r.start);
        let grow: usize = kept.iter().map(|op| op.bytes.len()).sum();
        let mut out = O::with_capacity(input.len() + grow + 10 * pieces.len().min(64));
        let mut cursor = 0usize;
        for (range, piece) in pieces {
            if range.start < cursor {
                return Err(WalkError::OverlappingEdits {
                    offset: range.start,
                });
            }
            out.input(input, cursor..range.start);
            match piece {
                Piece::Prefix(len) => out.varint(len),
                Piece::Bytes(b) => out.bytes(b),
            }
            cursor = range.end;
        }
        out.input(input, cursor..input.len());
        Ok(out)
    }
}

/// Appends a length-delimited field.
fn put_len_field(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// The ops of one failure edit: the first affected field is replaced by the new fields,
/// the other affected ones are removed.
fn failure_ops(
    failure: &FailureSite,
    edit: &FailureEdit,
    ops: &mut Vec<Op>,
) -> Result<(), &'static str> {
    let node = failure.node;
    let mut new = Vec::new();
    let affected: Vec<&Range<usize>> = match edit {
        FailureEdit::Seal { attributes } => {
            if failure.has_encoded_attributes() {
                return Err("cannot seal a failure that already has encoded_attributes");
            }
            put_len_field(&mut new, FAILURE_ENCODED_ATTRIBUTES, attributes);
            put_len_field(
                &mut new,
                FAILURE_MESSAGE,
                ENCODED_FAILURE_MESSAGE.as_bytes(),
            );
            failure
                .fields
                .iter()
                .filter(|(f, _)| *f == FAILURE_MESSAGE || *f == FAILURE_STACK_TRACE)
                .map(|(_, r)| r)
                .collect()
        }
        FailureEdit::Restore {
            message,
            stack_trace,
        } => {
            if !failure.has_encoded_attributes() {
                return Err("cannot restore a failure without encoded_attributes");
            }
            for (field, value) in [
                (FAILURE_MESSAGE, message),
                (FAILURE_STACK_TRACE, stack_trace),
            ] {
                if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                    put_len_field(&mut new, field, v.as_bytes());
                }
            }
            failure
                .fields
                .iter()
                .filter(|(f, _)| match *f {
                    FAILURE_MESSAGE => message.is_some(),
                    FAILURE_STACK_TRACE => stack_trace.is_some(),
                    _ => true,
                })
                .map(|(_, r)| r)
                .collect()
        }
    };
    let Some((first, rest)) = affected.split_first() else {
        return Err("the failure has no message or stack_trace to seal");
    };
    ops.push(Op {
        range: (*first).clone(),
        node,
        bytes: Bytes::from(new),
    });
    for r in rest {
        ops.push(Op {
            range: (*r).clone(),
            node,
            bytes: Bytes::new(),
        });
    }
    Ok(())
}
