//! Rebuilding a message with some payloads replaced.

use bytes::Bytes;

use crate::error::WalkError;
use crate::walk::Scan;
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
            return Ok(input.clone());
        }
        // Whole-buffer payload (scan of `Payload` itself): no length prefix to fix.
        if self.nodes.is_empty()
            && self.sites.len() == 1
            && self.sites[0].range() == (0..input.len())
        {
            return Ok(replacements[0].clone().unwrap_or_else(|| input.clone()));
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
        // A rewritten length prefix may itself change size (canonical varint of the new
        // length vs. the original bytes), which changes the parent's length too.
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
        let capacity = (input.len() as i64 + grow.max(0)) as usize + 10 * self.nodes.len().min(64);
        let mut out = Vec::with_capacity(capacity);
        let mut cursor = 0usize;
        let mut sites = self.sites.iter().zip(replacements).peekable();
        for (n, node) in self.nodes.iter().enumerate() {
            if delta[n] != 0 {
                out.extend_from_slice(&input[cursor..node.prefix.0]);
                put_varint(&mut out, (node.len as i64 + delta[n]) as u64);
                cursor = node.prefix.1;
            }
            while let Some((site, rep)) = sites.next_if(|(s, _)| s.node as usize == n) {
                if let Some(r) = rep {
                    let range = site.range();
                    out.extend_from_slice(&input[cursor..range.start]);
                    out.extend_from_slice(r);
                    cursor = range.end;
                }
            }
        }
        out.extend_from_slice(&input[cursor..]);
        Ok(Bytes::from(out))
    }
}
