//! The scanner: finds every payload site in a serialized message, guided by the schema table.

use std::fmt;
use std::ops::Range;

use crate::error::WalkError;
use crate::schema::{self, FieldKind, MessageType};
use crate::wire::{self, Fault, FaultKind, LEN};

/// Maximum nesting of messages (and groups) the walker follows before giving up with
/// [`WalkError::TooDeep`]. Counted in message levels, including messages inside `Any`
/// values and system envelopes. Real Temporal traffic nests about 10 levels
/// (plus one per `Failure.cause` link); protobuf implementations commonly stop at 100.
pub const MAX_DEPTH: usize = 100;

/// Metadata key that marks a payload as a system envelope (see the crate docs).
pub const SYSTEM_PAYLOAD_KEY: &str = "__temporal_system_payload";
/// The Nexus endpoint whose operation inputs are system envelopes.
pub const SYSTEM_NEXUS_ENDPOINT: &str = "__temporal_system";
const BINARY_PROTOBUF: &[u8] = b"binary/protobuf";

const NO_PARENT: u32 = u32::MAX;
/// Path segment flag: the segment is a message type (an `Any` value or an envelope),
/// not a field index.
const TYPE_SEGMENT: u32 = 1 << 31;

/// A length-delimited field on the way to at least one payload site.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// Byte range of the length prefix (varint).
    pub(crate) prefix: (usize, usize),
    /// Original value length.
    pub(crate) len: usize,
    /// Enclosing node, or `NO_PARENT`.
    pub(crate) parent: u32,
}

impl Node {
    pub(crate) fn parent(&self) -> Option<usize> {
        (self.parent != NO_PARENT).then_some(self.parent as usize)
    }
}

/// One serialized `temporal.api.common.v1.Payload` found by [`scan`].
#[derive(Clone, Debug)]
pub struct PayloadSite {
    range: Range<usize>,
    path: Box<[u32]>,
    pub(crate) node: u32,
}

impl PayloadSite {
    /// Byte range of the serialized Payload message (the value of its length-delimited
    /// field) in the scanned buffer.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The field path from the scanned message to this payload, rendered on `Display` as
    /// dotted proto field names, e.g.
    /// `history.events.workflow_execution_started_event_attributes.input.payloads`.
    /// Map values render as the map field (`header.fields`); the payload-bearing type inside
    /// an `Any` or a system envelope renders in brackets:
    /// `messages.body[temporal.api.update.v1.Request].input.args.payloads`.
    pub fn path(&self) -> SitePath<'_> {
        SitePath(&self.path)
    }
}

/// A field path, rendered lazily by its `Display` impl (see [`PayloadSite::path`]).
#[derive(Clone, Copy, Debug)]
pub struct SitePath<'a>(&'a [u32]);

impl fmt::Display for SitePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for &seg in self.0 {
            if seg & TYPE_SEGMENT != 0 {
                write!(f, "[{}]", MessageType((seg & !TYPE_SEGMENT) as u16).name())?;
                continue;
            }
            let name = schema::field_name(seg);
            if name.is_empty() {
                continue;
            }
            if !first {
                f.write_str(".")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

/// The result of [`scan`]: every payload site of one message, ready for [`Scan::splice`].
#[derive(Clone, Debug)]
pub struct Scan {
    pub(crate) sites: Vec<PayloadSite>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) input_len: usize,
    unknown_any: usize,
    opaque_system: usize,
}

impl Scan {
    /// The payload sites, in byte order.
    pub fn sites(&self) -> &[PayloadSite] {
        &self.sites
    }

    /// How many `google.protobuf.Any` values had a `type_url` naming a type not in the
    /// descriptor set; they were passed through untouched.
    pub fn unknown_any(&self) -> usize {
        self.unknown_any
    }

    /// How many system envelopes (see the crate docs) could not be opened (not
    /// `binary/protobuf`, missing or unknown `messageType`); they are passed through
    /// untouched and are not reported as sites, since the server must be able to read them.
    pub fn opaque_system_payloads(&self) -> usize {
        self.opaque_system
    }
}

/// Finds every payload site in `buf`, a serialized message of type `ty`.
///
/// Follows singular, repeated, oneof and map-value message fields that can lead to a
/// payload (each occurrence of a repeated or duplicated field), `Any` values of known
/// payload-bearing types and system envelopes; every other field is skipped by its wire
/// type without looking inside. Payloads under `SearchAttributes.indexed_fields` are never
/// reported. Never panics; malformed input gives a [`WalkError`].
pub fn scan(ty: MessageType, buf: &[u8]) -> Result<Scan, WalkError> {
    let mut w = Walker {
        buf,
        sites: Vec::new(),
        nodes: Vec::new(),
        path: Vec::with_capacity(16),
        unknown_any: 0,
        opaque_system: 0,
    };
    if ty == MessageType::PAYLOAD {
        // The whole buffer is one payload: a single site with no length prefix to fix.
        w.sites.push(PayloadSite {
            range: 0..buf.len(),
            path: Box::new([]),
            node: NO_PARENT,
        });
    } else if let Err(fault) = w.message(ty, 0, buf.len(), NO_PARENT, 0) {
        return Err(w.error(fault));
    }
    Ok(Scan {
        sites: w.sites,
        nodes: w.nodes,
        input_len: buf.len(),
        unknown_any: w.unknown_any,
        opaque_system: w.opaque_system,
    })
}

struct Walker<'a> {
    buf: &'a [u8],
    sites: Vec<PayloadSite>,
    nodes: Vec<Node>,
    path: Vec<u32>,
    unknown_any: usize,
    opaque_system: usize,
}

impl Walker<'_> {
    fn error(&self, fault: Fault) -> WalkError {
        let path = SitePath(&self.path).to_string();
        let offset = fault.offset;
        match fault.kind {
            FaultKind::Truncated => WalkError::Truncated { offset, path },
            FaultKind::BadVarint => WalkError::BadVarint { offset, path },
            FaultKind::InvalidTag { wire_type, field } => WalkError::InvalidWireType {
                wire_type,
                field,
                offset,
                path,
            },
            FaultKind::UnexpectedWireType { wire_type, field } => WalkError::UnexpectedWireType {
                wire_type,
                field,
                offset,
                path,
            },
            FaultKind::LengthOutOfBounds { len } => {
                WalkError::LengthOutOfBounds { len, offset, path }
            }
            FaultKind::TooDeep => WalkError::TooDeep {
                limit: MAX_DEPTH,
                offset,
                path,
            },
        }
    }

    /// Reads the length prefix of a length-delimited field whose tag ends at `*pos` and
    /// pushes a node for it.
    #[inline]
    fn enter(
        &mut self,
        pos: &mut usize,
        end: usize,
        parent: u32,
    ) -> Result<(u32, usize, usize), Fault> {
        let p0 = *pos;
        let len_at = *pos;
        let (vstart, vend) = wire::read_len(self.buf, pos, end)?;
        let id = self.nodes.len() as u32;
        self.nodes.push(Node {
            prefix: (p0, vstart),
            len: vend - vstart,
            parent,
        });
        debug_assert!(len_at <= vstart);
        Ok((id, vstart, vend))
    }

    /// Drops the node `id` (and anything after it) if no site was found below it.
    #[inline]
    fn leave(&mut self, id: u32, sites_before: usize) {
        if self.sites.len() == sites_before {
            self.nodes.truncate(id as usize);
        }
    }

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
        let system_input = match ty.system_nexus() {
            Some((endpoint, input)) => {
                let ep = last_len_field(self.buf, start, end, endpoint, MAX_DEPTH - depth)?;
                (ep.map(|(a, b)| &self.buf[a..b]) == Some(SYSTEM_NEXUS_ENDPOINT.as_bytes()))
                    .then_some(input)
            }
            None => None,
        };
        let buf = self.buf;
        let mut pos = start;
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            let Some((findex, info)) = ty.field(field) else {
                wire::skip_value(buf, &mut pos, end, field, wt, tag_at, MAX_DEPTH - depth)?;
                continue;
            };
            if wt != LEN {
                if wt > wire::I32 || wt == wire::EGROUP {
                    return Err(Fault::new(
                        FaultKind::InvalidTag {
                            wire_type: wt,
                            field,
                        },
                        tag_at,
                    ));
                }
                return Err(Fault::new(
                    FaultKind::UnexpectedWireType {
                        wire_type: wt,
                        field,
                    },
                    tag_at,
                ));
            }
            let (id, vstart, vend) = self.enter(&mut pos, end, parent)?;
            let before = self.sites.len();
            self.path.push(findex);
            let target = MessageType(info.target);
            let r = match info.kind {
                FieldKind::Payload => {
                    self.payload(vstart, vend, id, depth + 1, system_input == Some(field))
                }
                FieldKind::Message => self.message(target, vstart, vend, id, depth + 1),
                FieldKind::Any => self.any(vstart, vend, id, depth + 1),
            };
            r?;
            self.path.pop();
            self.leave(id, before);
        }
        Ok(())
    }

    fn any(&mut self, start: usize, end: usize, node: u32, depth: usize) -> Result<(), Fault> {
        if depth >= MAX_DEPTH {
            return Err(Fault::new(FaultKind::TooDeep, start));
        }
        let buf = self.buf;
        let mut pos = start;
        let mut type_url: Option<(usize, usize)> = None;
        let mut value: Option<usize> = None; // offset of the value's length prefix
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            match (field, wt) {
                (1, LEN) => type_url = Some(wire::read_len(buf, &mut pos, end)?),
                (2, LEN) => {
                    value = Some(pos);
                    wire::read_len(buf, &mut pos, end)?;
                }
                _ => wire::skip_value(buf, &mut pos, end, field, wt, tag_at, MAX_DEPTH - depth)?,
            }
        }
        let Some((a, b)) = type_url else {
            return Ok(());
        };
        let url = &buf[a..b];
        let name = match url.iter().rposition(|&c| c == b'/') {
            Some(i) => &url[i + 1..],
            None => url,
        };
        let Some(ty) = std::str::from_utf8(name)
            .ok()
            .and_then(MessageType::by_name)
        else {
            self.unknown_any += 1;
            return Ok(());
        };
        if !ty.can_hold_payloads() {
            return Ok(());
        }
        if let Some(mut p) = value {
            self.typed_value(ty, &mut p, end, node, depth)?;
        }
        Ok(())
    }

    /// Walks a length-delimited value (prefix at `*pos`) as a message of type `ty`: the
    /// value of an `Any` or the data of a system envelope.
    fn typed_value(
        &mut self,
        ty: MessageType,
        pos: &mut usize,
        end: usize,
        parent: u32,
        depth: usize,
    ) -> Result<(), Fault> {
        let (id, vstart, vend) = self.enter(pos, end, parent)?;
        let before = self.sites.len();
        self.path.push(TYPE_SEGMENT | u32::from(ty.0));
        if ty == MessageType::PAYLOAD {
            self.payload(vstart, vend, id, depth + 1, false)?;
        } else {
            self.message(ty, vstart, vend, id, depth + 1)?;
        }
        self.path.pop();
        self.leave(id, before);
        Ok(())
    }

    /// A Payload value at `start..end` whose field is node `node`. Either a site, or a
    /// system envelope whose inner payloads are the sites.
    fn payload(
        &mut self,
        start: usize,
        end: usize,
        node: u32,
        depth: usize,
        system_input: bool,
    ) -> Result<(), Fault> {
        let info = PayloadInfo::read(self.buf, start, end);
        let envelope =
            system_input || (info.marked && (info.message_type.is_some() || info.binary_protobuf));
        if !envelope {
            self.sites.push(PayloadSite {
                range: start..end,
                path: self.path.as_slice().into(),
                node,
            });
            return Ok(());
        }
        let ty = info
            .message_type
            .and_then(|(a, b)| std::str::from_utf8(&self.buf[a..b]).ok())
            .and_then(MessageType::by_name);
        match (info.binary_protobuf, ty, info.data) {
            (true, Some(ty), Some(mut data)) if ty.can_hold_payloads() => {
                if depth >= MAX_DEPTH {
                    return Err(Fault::new(FaultKind::TooDeep, start));
                }
                self.typed_value(ty, &mut data, end, node, depth)
            }
            (true, Some(_), _) => Ok(()), // nothing inside can be a payload
            _ => {
                self.opaque_system += 1;
                Ok(())
            }
        }
    }
}

/// What the walker needs to know about a Payload to spot system envelopes.
#[derive(Default)]
struct PayloadInfo {
    /// `metadata["__temporal_system_payload"] == "true"`.
    marked: bool,
    /// `metadata["encoding"] == "binary/protobuf"`.
    binary_protobuf: bool,
    /// Byte range of `metadata["messageType"]`, if present and non-empty.
    message_type: Option<(usize, usize)>,
    /// Offset of the length prefix of the last `data` field.
    data: Option<usize>,
}

impl PayloadInfo {
    /// Reads the metadata map and the data field. A Payload that does not parse is treated
    /// as an ordinary (opaque) payload: its bytes are the codec's business.
    fn read(buf: &[u8], start: usize, end: usize) -> PayloadInfo {
        Self::try_read(buf, start, end).unwrap_or_default()
    }

    fn try_read(buf: &[u8], start: usize, end: usize) -> Result<PayloadInfo, Fault> {
        let mut info = PayloadInfo::default();
        let mut pos = start;
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            match (field, wt) {
                (1, LEN) => {
                    let (a, b) = wire::read_len(buf, &mut pos, end)?;
                    let key = last_len_field(buf, a, b, 1, 2)?
                        .map(|(x, y)| &buf[x..y])
                        .unwrap_or(b"");
                    let value = last_len_field(buf, a, b, 2, 2)?;
                    let vbytes = value.map(|(x, y)| &buf[x..y]).unwrap_or(b"");
                    match key {
                        b"__temporal_system_payload" => info.marked = vbytes == b"true",
                        b"encoding" => info.binary_protobuf = vbytes == BINARY_PROTOBUF,
                        b"messageType" => info.message_type = value.filter(|(x, y)| x < y),
                        _ => {}
                    }
                }
                (2, LEN) => {
                    info.data = Some(pos);
                    wire::read_len(buf, &mut pos, end)?;
                }
                _ => wire::skip_value(buf, &mut pos, end, field, wt, tag_at, 8)?,
            }
        }
        Ok(info)
    }
}

/// The value range of the last length-delimited occurrence of `field` among the top-level
/// fields of `buf[start..end]`.
pub(crate) fn last_len_field(
    buf: &[u8],
    start: usize,
    end: usize,
    field: u32,
    depth_left: usize,
) -> Result<Option<(usize, usize)>, Fault> {
    let mut pos = start;
    let mut found = None;
    while pos < end {
        let tag_at = pos;
        let (f, wt) = wire::read_tag(buf, &mut pos, end)?;
        if f == field && wt == LEN {
            found = Some(wire::read_len(buf, &mut pos, end)?);
        } else {
            wire::skip_value(buf, &mut pos, end, f, wt, tag_at, depth_left)?;
        }
    }
    Ok(found)
}

/// Reads the top-level string field `field_name` of a serialized message of type `ty`,
/// e.g. the request's `namespace` or `workflow_id`.
///
/// Only top-level fields are looked at (nothing nested); if the field occurs several times
/// the last occurrence wins, as protobuf specifies. Returns `None` if the type has no such
/// singular string field, the field is absent, the buffer is malformed, or the value is not
/// UTF-8.
pub fn top_level_string<'a>(ty: MessageType, buf: &'a [u8], field_name: &str) -> Option<&'a str> {
    let number = ty.string_field(field_name)?;
    let (a, b) = last_len_field(buf, 0, buf.len(), number, MAX_DEPTH).ok()??;
    std::str::from_utf8(&buf[a..b]).ok()
}
