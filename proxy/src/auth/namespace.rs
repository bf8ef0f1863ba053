//! Which namespace a gRPC request acts on, as the server will see it.
//!
//! The namespace is the request message's own top-level `namespace` field (the last
//! occurrence on the wire, as protobuf and the server read it), found with the same walker
//! tables the payload rewrite uses. A client-chosen `temporal-namespace` header never decides
//! it; one that disagrees with the body is refused by the layer.
//!
//! Methods whose request has no `namespace` field (OperatorService's Nexus endpoint and
//! cluster methods, `ListNamespaces`, ...), requests that name their namespace by id
//! (`namespace_id`, `DescribeNamespace`'s `id`), and methods the descriptors do not know are
//! [`Target::Global`]: only an identity granted every namespace (`"*"`) may call them.
//! A few namespace-less methods that only describe the server are [`Target::Open`] to every
//! authenticated identity, because SDKs call them on connect ([`OPEN_METHODS`]).

use payload_gateway_proto::{Method, method, top_level_string};

/// Namespace-less methods every authenticated identity may call: the SDKs' connect-time
/// server description and gRPC health checks. They return no namespace data.
pub const OPEN_METHODS: [&str; 4] = [
    "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo",
    "/temporal.api.workflowservice.v1.WorkflowService/GetClusterInfo",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// What a request acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Nothing namespaced: any authenticated identity may call it.
    Open,
    /// This namespace (empty when the request leaves the field unset).
    Namespace(String),
    /// Nothing the gateway can check against a namespace list; the reason, for the denial.
    Global(String),
}

/// Whether the target is known from the path alone or the request body must be read.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Known from the path.
    Decided(Kind),
    /// Read the request's first message, then call [`target_of`].
    ReadBody(Method),
}

/// The kind of a target decided from the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`Target::Open`].
    Open,
    /// A method the descriptors do not know.
    Unknown,
    /// A known method whose request names no namespace.
    NoNamespace,
}

/// How to find the target of a request to `path`.
pub fn plan(path: &str) -> Plan {
    if OPEN_METHODS.contains(&path) {
        return Plan::Decided(Kind::Open);
    }
    match method(path) {
        None => Plan::Decided(Kind::Unknown),
        Some(m) if m.request.has_string_field("namespace") => Plan::ReadBody(m),
        Some(_) => Plan::Decided(Kind::NoNamespace),
    }
}

/// The target of a request to a path decided without reading the body.
pub fn decided_target(path: &str, kind: Kind) -> Target {
    match kind {
        Kind::Open => Target::Open,
        Kind::Unknown => Target::Global(format!(
            "method {path} is unknown to the gateway, which cannot tell which namespace it acts on"
        )),
        Kind::NoNamespace => Target::Global(format!(
            "method {} names no namespace",
            crate::metrics::short_method(path)
        )),
    }
}

/// The target of `message`, the first request message of method `m` (`None`: no message).
pub fn target_of(m: Method, message: Option<&[u8]>) -> Target {
    let message = message.unwrap_or(&[]);
    let by_id = |field: &str| {
        m.request.has_string_field(field)
            && top_level_string(m.request, message, field).is_some_and(|v| !v.is_empty())
    };
    if by_id("namespace_id")
        || (m.request.name() == "temporal.api.workflowservice.v1.DescribeNamespaceRequest"
            && by_id("id"))
    {
        return Target::Global(format!(
            "the {} request names its namespace by id",
            crate::metrics::short_method(m.path)
        ));
    }
    Target::Namespace(
        top_level_string(m.request, message, "namespace")
            .unwrap_or_default()
            .to_owned(),
    )
}
