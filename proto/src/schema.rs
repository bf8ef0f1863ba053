//! The generated schema table (from the `temporalio-protos` descriptor set) and lookups.
//!
//! The table lists every message type of the descriptor set (Temporal API, cloud API,
//! test service, `grpc.health.v1`, `google.rpc.Status`, well-known types, Core SDK types),
//! and for each one only the fields that can lead to a `temporal.api.common.v1.Payload`
//! (computed as a fixpoint over the message graph, so recursive types such as
//! `Failure.cause` terminate). `SearchAttributes.indexed_fields` is left out on purpose:
//! the server indexes search attributes, so they are never offered for rewriting.

use std::fmt;

/// How the walker treats a payload-reaching field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// An ordinary message field that (transitively) contains payloads.
    Message,
    /// A `temporal.api.common.v1.Payload` field: a payload site.
    Payload,
    /// A `google.protobuf.Any` field: walked according to its `type_url`.
    Any,
}

/// One payload-reaching field of a message.
#[derive(Debug)]
pub(crate) struct FieldInfo {
    pub(crate) number: u32,
    /// Proto field name; empty for the `value` field of a map entry (rendered as the map).
    pub(crate) name: &'static str,
    pub(crate) target: u16,
    pub(crate) kind: FieldKind,
}

/// Per message: index ranges into [`FIELDS`] and [`STRING_FIELDS`].
#[derive(Debug)]
pub(crate) struct MsgInfo {
    pub(crate) fields: (u32, u32),
    pub(crate) strings: (u32, u32),
    pub(crate) reach: bool,
    /// `(endpoint field, input field)` for Nexus schedule messages, `(0, 0)` otherwise.
    pub(crate) nexus: (u32, u32),
}

include!(concat!(env!("OUT_DIR"), "/schema_table.rs"));

/// Full name of the Payload message.
pub const PAYLOAD_TYPE_NAME: &str = "temporal.api.common.v1.Payload";
/// Full name of `google.protobuf.Any`.
pub const ANY_TYPE_NAME: &str = "google.protobuf.Any";

/// A protobuf message type known to the descriptor set this crate was built from.
///
/// Cheap to copy (a `u16` index into the generated table).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageType(pub(crate) u16);

impl MessageType {
    /// `temporal.api.common.v1.Payload`.
    pub const PAYLOAD: MessageType = MessageType(PAYLOAD_TYPE);
    /// `google.protobuf.Any`.
    pub const ANY: MessageType = MessageType(ANY_TYPE);

    /// Looks a type up by its full name, e.g. `"temporal.api.update.v1.Request"` or
    /// `"google.rpc.Status"`. A leading `.` is accepted.
    pub fn by_name(name: &str) -> Option<MessageType> {
        let name = name.strip_prefix('.').unwrap_or(name);
        NAMES
            .binary_search(&name)
            .ok()
            .map(|i| MessageType(i as u16))
    }

    /// The full protobuf name, e.g. `"temporal.api.common.v1.Payloads"`.
    pub fn name(self) -> &'static str {
        NAMES[self.0 as usize]
    }

    /// Whether a message of this type can contain a payload the walker would report
    /// (`Payload` itself and `Any` count; `SearchAttributes` does not).
    pub fn can_hold_payloads(self) -> bool {
        MESSAGES[self.0 as usize].reach
    }

    /// Iterates over every message type in the table.
    pub fn all() -> impl Iterator<Item = MessageType> {
        (0..NAMES.len() as u16).map(MessageType)
    }

    /// The payload-reaching field with this number, with its index in the field table.
    #[inline]
    pub(crate) fn field(self, number: u32) -> Option<(u32, &'static FieldInfo)> {
        let (a, b) = MESSAGES[self.0 as usize].fields;
        let fs = &FIELDS[a as usize..b as usize];
        let i = if fs.len() <= 8 {
            fs.iter().position(|f| f.number == number)?
        } else {
            fs.binary_search_by_key(&number, |f| f.number).ok()?
        };
        Some((a + i as u32, &fs[i]))
    }

    /// For Nexus schedule messages: `(endpoint field number, input field number)`.
    #[inline]
    pub(crate) fn system_nexus(self) -> Option<(u32, u32)> {
        let n = MESSAGES[self.0 as usize].nexus;
        (n.0 != 0).then_some(n)
    }

    /// Whether messages of this type have a singular string (or bytes) field called `name`
    /// (e.g. whether a request names its `namespace` at all, or carries a `task_token`).
    pub fn has_string_field(self, name: &str) -> bool {
        self.string_field(name).is_some()
    }

    pub(crate) fn string_field(self, name: &str) -> Option<u32> {
        let (a, b) = MESSAGES[self.0 as usize].strings;
        let fs = &STRING_FIELDS[a as usize..b as usize];
        fs.binary_search_by_key(&name, |(n, _)| n)
            .ok()
            .map(|i| fs[i].1)
    }
}

impl fmt::Debug for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageType({})", self.name())
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A gRPC method of one of the services in the descriptor set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Method {
    /// The full path, e.g. `/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution`.
    pub path: &'static str,
    /// The request message type.
    pub request: MessageType,
    /// The response message type.
    pub response: MessageType,
    /// Whether the client sends a stream of requests.
    pub client_streaming: bool,
    /// Whether the server sends a stream of responses.
    pub server_streaming: bool,
}

/// Looks up a gRPC method by its HTTP/2 `:path`, e.g.
/// `/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution`.
///
/// Covers every service in the descriptor set: WorkflowService, OperatorService, the
/// cloud service, the test service, `grpc.health.v1.Health`.
pub fn method(path: &str) -> Option<Method> {
    METHODS.binary_search_by_key(&path, |m| m.0).ok().map(|i| {
        let (path, req, resp, cs, ss) = METHODS[i];
        Method {
            path,
            request: MessageType(req),
            response: MessageType(resp),
            client_streaming: cs,
            server_streaming: ss,
        }
    })
}

/// Iterates over every gRPC method in the table.
pub fn methods() -> impl Iterator<Item = Method> {
    METHODS.iter().filter_map(|m| method(m.0))
}

/// The name of field number `index` in the generated field table (for path rendering).
pub(crate) fn field_name(index: u32) -> &'static str {
    FIELDS[index as usize].name
}
