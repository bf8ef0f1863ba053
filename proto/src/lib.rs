//! Descriptor-guided protobuf wire walker for Temporal payloads.
//!
//! The proxy rewrites every `temporal.api.common.v1.Payload` in gRPC messages without
//! decoding them into Rust structs: [`scan`] walks the wire format of a message guided by
//! a table generated at build time from the `temporalio-protos` descriptor set
//! ([`MessageType`], [`method`]), and [`Scan::splice`] rebuilds the message with some
//! payloads replaced ([`Scan::splice_with`]: and some failures sealed or restored),
//! copying everything else byte for byte.
//!
//! ```
//! use payload_gateway_proto::{method, scan, top_level_string};
//!
//! let m = method("/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution").unwrap();
//! // field 1 = namespace "ns"
//! let buf = bytes::Bytes::from_static(&[0x0a, 0x02, b'n', b's']);
//! assert_eq!(top_level_string(m.request, &buf, "namespace"), Some("ns"));
//! let s = scan(m.request, &buf).unwrap();
//! assert!(s.sites().is_empty());
//! assert_eq!(s.splice(&buf, &[]).unwrap(), buf);
//! ```
//!
//! # What is a payload site
//!
//! - Every `Payload` reachable through singular, repeated, oneof and map-value message
//!   fields, recursively (each occurrence of a repeated or duplicated field).
//! - `google.protobuf.Any`: the last `type_url` (field 1, which may follow the value)
//!   names the type after its last `/`; a known type that can hold payloads has its last
//!   `value` (field 2) walked as that type (update `Request`/`Response`/... in
//!   `protocol.v1.Message.body`, errordetails in `google.rpc.Status.details`). An `Any`
//!   of a type not in the descriptor set is passed through untouched and counted in
//!   [`Scan::unknown_any`].
//! - Never under `temporal.api.common.v1.SearchAttributes.indexed_fields`: the server
//!   indexes search attributes, so they stay plaintext. This field is dropped from the
//!   table at build time, so `SearchAttributes` reports `can_hold_payloads() == false`.
//! - Opaque `bytes` fields (task tokens, `DataBlob.data`) are never looked into.
//! - A map entry whose value is absent on the wire (prost omits an all-default
//!   `Payload{}` map value) has no site: there are no bytes to rewrite, although a decoder
//!   materialises an empty payload there.
//! - Sites are reported in byte order; a site's [`PayloadSite::range`] never overlaps
//!   another's.
//!
//! # System payloads (rules taken from the Go SDK's `api-go/proxy` payload visitor)
//!
//! Some payloads are not user data but envelopes the server itself must read, holding a
//! serialized proto message whose own fields carry the user payloads. Encoding the
//! envelope would break the server, and leaving it alone would leak the inner payloads,
//! so the walker opens the envelope and reports the payloads *inside* it instead (the path
//! shows the envelope type in brackets, e.g. `...input[temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest].input.payloads`).
//! A payload is an envelope when:
//!
//! 1. its metadata has `__temporal_system_payload: "true"` and also a `messageType` or
//!    `encoding: binary/protobuf` (older servers mark ordinary system Nexus results
//!    without a `messageType` and with another encoding: those stay ordinary payloads); or
//! 2. it is the `input` of a `command.v1.ScheduleNexusOperationCommandAttributes` or
//!    `history.v1.NexusOperationScheduledEventAttributes` whose `endpoint` is
//!    `__temporal_system` (the system Nexus endpoint; the endpoint field may come after
//!    the input on the wire, it is read first).
//!
//! An envelope is opened when its `encoding` is `binary/protobuf`, its `messageType`
//! names a known type and it has a `data` field; its last `data` field is walked as that
//! type (a known type that cannot hold payloads is left as it is). An envelope that cannot
//! be opened (another encoding, missing or unknown `messageType`, no `data`) is reported
//! as an ordinary payload site, so a caller encodes it whole rather than forwarding
//! contents it cannot see (the Go visitor returns an error for it); it is also counted in
//! [`Scan::opaque_system_payloads`].
//!
//! # Failures
//!
//! `temporal.api.failure.v1.Failure.message` and `stack_trace` are plain strings, not
//! payloads. Every `Failure` reached by the walk (at any depth, including cause chains,
//! `Any` values and system envelopes) that has a `message`, `stack_trace` or
//! `encoded_attributes` field on the wire is reported in [`Scan::failures`] as a
//! [`FailureSite`] (value ranges of the last `message` and `stack_trace`, whether
//! `encoded_attributes` is present and which payload site it is). [`Scan::splice_with`]
//! applies [`FailureEdit`]s in the same pass as the payload replacements: `Seal` moves
//! message and stack trace into `encoded_attributes` the way the SDKs'
//! `encode_common_attributes` does, `Restore` undoes it. Both only replace and remove the
//! failure's own top-level fields; every other byte is kept.
//!
//! Some messages repeat a failure's message in a plain string beside it
//! (`RespondQueryTaskCompletedRequest.error_message`, `WorkflowQueryResult.error_message`, the
//! `google.rpc.Status.message` of a failed query): [`Scan::failure_texts`] reports them as
//! [`FailureText`]s with their sibling failures, and [`Scan::splice_edits`] replaces them in
//! the same pass.
//!
//! # Limits
//!
//! Nesting is bounded by [`MAX_DEPTH`]; malformed input (truncation, bad varints, invalid
//! wire types, lengths past the end) yields a [`WalkError`] with the byte offset and field
//! path; nothing panics on any input (fuzzed, see `fuzz/`).
#![warn(missing_docs)]

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod schema;
mod search_attributes;
mod splice;
mod walk;
mod wire;

/// Path of the descriptor set the schema table was generated from (inside the build
/// directory). For tests and benchmarks that want the same types in `prost-reflect`.
#[doc(hidden)]
pub const DESCRIPTOR_SET_PATH: &str = env!("PGW_DESCRIPTOR_PATH");

pub use error::WalkError;
pub use schema::{ANY_TYPE_NAME, MessageType, Method, PAYLOAD_TYPE_NAME, method, methods};
pub use search_attributes::{
    SEARCH_ATTRIBUTES_TYPE_NAME, replace_top_level_string, scan_search_attributes,
};
pub use splice::SHARE_MIN as SPLICE_SHARE_MIN;
pub use walk::{
    ENCODED_FAILURE_MESSAGE, FAILURE_TYPE_NAME, FailureEdit, FailureSite, FailureText, MAX_DEPTH,
    MAX_UNKNOWN_ANYS, PayloadSite, RawField, SYSTEM_NEXUS_ENDPOINT, SYSTEM_PAYLOAD_KEY, Scan,
    SitePath, StringFieldError, TextEdit, UnknownAny, len_fields_by_number, scan,
    string_field_by_number, top_level_bytes, top_level_fields, top_level_string,
    top_level_string_strict,
};
