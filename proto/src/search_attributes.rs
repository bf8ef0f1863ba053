//! Where `temporal.api.common.v1.SearchAttributes` messages are in a serialized message, for
//! the gateway's protected search attributes (the payload walk leaves them out on purpose).
//!
//! A second table generated at build time lists, per message type, the message fields that
//! can lead to a `SearchAttributes` (a fixpoint over the message graph like the payload
//! table). [`scan_search_attributes`] walks only those fields and reports every
//! `SearchAttributes` value as a site of a [`Scan`], so [`Scan::splice`] replaces them and
//! fixes the enclosing length prefixes exactly as it does for payloads. `google.protobuf.Any`
//! values and payload envelopes are not looked into (no Temporal API message carries search
//! attributes there).

use bytes::Bytes;

use crate::error::WalkError;
use crate::schema::{MessageType, SA_FIELDS, SA_MESSAGES, SEARCH_ATTRIBUTES_TYPE};
use crate::walk::{MAX_DEPTH, NO_PARENT, Node, PayloadSite, Scan, StringFieldError, fault_error};
use crate::wire::{self, Fault, FaultKind, LEN};

/// Full name of the search attributes message.
pub const SEARCH_ATTRIBUTES_TYPE_NAME: &str = "temporal.api.common.v1.SearchAttributes";

impl MessageType {
    /// `temporal.api.common.v1.SearchAttributes`.
    pub const SEARCH_ATTRIBUTES: MessageType = MessageType(SEARCH_ATTRIBUTES_TYPE);

    /// Whether a message of this type can contain a `SearchAttributes` (the type itself
    /// included).
    pub fn can_hold_search_attributes(self) -> bool {
        SA_MESSAGES[self.0 as usize].2
    }

    /// The search-attribute-reaching field with this number: `(target type, name)`.
    fn search_attribute_field(self, number: u32) -> Option<(MessageType, &'static str)> {
        let (a, b, _) = SA_MESSAGES[self.0 as usize];
        SA_FIELDS[a as usize..b as usize]
            .iter()
            .find(|f| f.0 == number)
            .map(|f| (MessageType(f.1), f.2))
    }

    /// The field number of the singular string field `name` (`None`: no such field).
    pub fn string_field_number(self, name: &str) -> Option<u32> {
        self.string_field(name)
    }
}

/// Finds every `temporal.api.common.v1.SearchAttributes` in `buf`, a serialized message of
/// type `ty`, in byte order. Each site's range is the serialized `SearchAttributes` (the
/// value of its length-delimited field); its path renders empty. Splice with
/// [`Scan::splice`]. Never panics; malformed input gives a [`WalkError`].
pub fn scan_search_attributes(ty: MessageType, buf: &[u8]) -> Result<Scan, WalkError> {
    let mut w = SaWalker {
        buf,
        sites: Vec::new(),
        nodes: Vec::new(),
    };
    if ty == MessageType::SEARCH_ATTRIBUTES {
        w.sites.push(PayloadSite::new(0..buf.len(), NO_PARENT));
    } else if ty.can_hold_search_attributes() {
        w.message(ty, 0, buf.len(), NO_PARENT, 0)
            .map_err(|fault| fault_error(fault, String::new()))?;
    }
    Ok(Scan::from_sites(w.sites, w.nodes, buf.len()))
}

struct SaWalker<'a> {
    buf: &'a [u8],
    sites: Vec<PayloadSite>,
    nodes: Vec<Node>,
}

impl SaWalker<'_> {
    fn message(
        &mut self,
        ty: MessageType,
        start: usize,
        end: usize,
        parent: u32,
        depth: usize,
    ) -> Result<(), Fault> {
        if depth >= MAX_DEPTH {
            return Err(Fault::new(FaultKind::TooDeep, start));
        }
        let buf = self.buf;
        let mut pos = start;
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            let target = (wt == LEN)
                .then(|| ty.search_attribute_field(field))
                .flatten();
            let Some((target, _)) = target else {
                wire::skip_value(buf, &mut pos, end, field, wt, tag_at, MAX_DEPTH - depth)?;
                continue;
            };
            let prefix_at = pos;
            let (vstart, vend) = wire::read_len(buf, &mut pos, end)?;
            let id = self.nodes.len() as u32;
            self.nodes.push(Node {
                prefix: (prefix_at, vstart),
                len: vend - vstart,
                parent,
            });
            let before = self.sites.len();
            if target == MessageType::SEARCH_ATTRIBUTES {
                self.sites.push(PayloadSite::new(vstart..vend, id));
            } else {
                self.message(target, vstart, vend, id, depth + 1)?;
            }
            if self.sites.len() == before {
                self.nodes.truncate(id as usize);
            }
        }
        Ok(())
    }
}

/// `buf` (a serialized message of type `ty`) with its top-level string field `name` set to
/// `value`: every length-delimited occurrence of the field is dropped and one is appended
/// (field order does not matter to protobuf parsers; the last occurrence wins). Every other
/// byte is kept. `Ok(None)`: the type has no such field.
pub fn replace_top_level_string(
    ty: MessageType,
    buf: &[u8],
    name: &str,
    value: &str,
) -> Result<Option<Bytes>, StringFieldError> {
    let Some(number) = ty.string_field(name) else {
        return Ok(None);
    };
    let malformed = |fault| StringFieldError::Malformed(fault_error(fault, String::new()));
    let mut out = Vec::with_capacity(buf.len() + value.len() + 8);
    let mut pos = 0;
    while pos < buf.len() {
        let tag_at = pos;
        let (f, wt) = wire::read_tag(buf, &mut pos, buf.len()).map_err(malformed)?;
        wire::skip_value(buf, &mut pos, buf.len(), f, wt, tag_at, MAX_DEPTH).map_err(malformed)?;
        if !(f == number && wt == LEN) {
            out.extend_from_slice(&buf[tag_at..pos]);
        }
    }
    wire::put_varint(&mut out, (u64::from(number) << 3) | u64::from(LEN));
    wire::put_varint(&mut out, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
    Ok(Some(Bytes::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method;

    fn put_len(out: &mut Vec<u8>, field: u32, value: &[u8]) {
        wire::put_varint(out, (u64::from(field) << 3) | 2);
        wire::put_varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    #[test]
    fn finds_search_attributes_of_a_start_request_and_splices_them() {
        let m = method("/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution")
            .unwrap();
        assert!(m.request.can_hold_search_attributes());
        // namespace = "ns" (1), search_attributes (15) = {indexed_fields: {"A": payload}}
        let mut entry = Vec::new();
        put_len(&mut entry, 1, b"A");
        put_len(&mut entry, 2, &[0x12, 0x03, b'"', b'x', b'"']);
        let mut sa = Vec::new();
        put_len(&mut sa, 1, &entry);
        let mut msg = Vec::new();
        put_len(&mut msg, 1, b"ns");
        put_len(&mut msg, 15, &sa);
        put_len(&mut msg, 99, b"unknown");
        let msg = Bytes::from(msg);
        let s = scan_search_attributes(m.request, &msg).unwrap();
        assert_eq!(s.sites().len(), 1);
        assert_eq!(&msg[s.sites()[0].range()], &sa[..]);
        let bigger = Bytes::from(vec![0x0a; 200]);
        let out = s.splice(&msg, &[Some(bigger.clone())]).unwrap();
        let again = scan_search_attributes(m.request, &out).unwrap();
        assert_eq!(&out[again.sites()[0].range()], &bigger[..]);
        assert!(out.ends_with(b"unknown"));
    }

    #[test]
    fn types_without_search_attributes_have_no_sites() {
        let m = method("/temporal.api.workflowservice.v1.WorkflowService/SignalWorkflowExecution")
            .unwrap();
        assert!(!m.request.can_hold_search_attributes());
        let s = scan_search_attributes(m.request, &[0x0a, 0x01, b'n']).unwrap();
        assert!(s.sites().is_empty());
    }

    #[test]
    fn response_and_history_types_reach_search_attributes() {
        for name in [
            "temporal.api.workflowservice.v1.ListWorkflowExecutionsResponse",
            "temporal.api.workflowservice.v1.DescribeWorkflowExecutionResponse",
            "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
            "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
            "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
            "temporal.api.workflowservice.v1.ExecuteMultiOperationRequest",
            "temporal.api.workflowservice.v1.CreateScheduleRequest",
            "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest",
        ] {
            let t = MessageType::by_name(name).unwrap();
            assert!(t.can_hold_search_attributes(), "{name}");
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let m = method("/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution")
            .unwrap();
        assert!(scan_search_attributes(m.request, &[0x7a, 0x05, 0x0a]).is_err());
    }

    #[test]
    fn replaces_a_top_level_string() {
        let t =
            MessageType::by_name("temporal.api.workflowservice.v1.ListWorkflowExecutionsRequest")
                .unwrap();
        let n = t.string_field_number("query").unwrap();
        let mut msg = Vec::new();
        put_len(&mut msg, n, b"old");
        put_len(&mut msg, 1, b"ns");
        put_len(&mut msg, n, b"older");
        let out = replace_top_level_string(t, &msg, "query", "new")
            .unwrap()
            .unwrap();
        assert_eq!(crate::top_level_string(t, &out, "query"), Some("new"));
        assert_eq!(crate::top_level_string(t, &out, "namespace"), Some("ns"));
        assert_eq!(out.len(), 4 + 5);
    }
}
