//! What a request acts on, for authorization: decided by the ingress from the same bytes it
//! forwards.
//!
//! The namespace is the request message's own top-level `namespace` field (see
//! [`super::decide`]). A client-chosen `temporal-namespace` header never decides it; one that
//! disagrees with the body is refused by the auth layer.
//!
//! Methods whose request has no `namespace` field (OperatorService's Nexus endpoint and
//! cluster methods, `ListNamespaces`, ...), requests that name their namespace by id
//! (`namespace_id`, `DescribeNamespace`'s `id`), and methods the descriptors do not know are
//! [`Target::Global`]: only an identity granted every namespace (`"*"`) may call them.
//! A few namespace-less methods that only describe the server are [`Target::Open`] to every
//! authenticated identity, because SDKs call them on connect ([`OPEN_METHODS`]).

use payload_gateway_proto::{
    Method, StringFieldError, len_fields_by_number, string_field_by_number, top_level_bytes,
    top_level_string_strict,
};

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

/// The target of a request decided from its path alone: an open method, a method the
/// descriptors do not know, or a method of another service.
pub fn of_path(path: &str) -> Target {
    if OPEN_METHODS.contains(&path) {
        return Target::Open;
    }
    Target::Global(format!(
        "method {path} is unknown to the gateway, which cannot tell which namespace it acts on"
    ))
}

/// The target of `message`, the request message of the known method `m`, whose `namespace`
/// field the ingress read as `namespace` (`None`: the type has none).
pub fn of_message(
    m: Method,
    message: &[u8],
    namespace: Option<&str>,
) -> Result<Target, StringFieldError> {
    if OPEN_METHODS.contains(&m.path) {
        return Ok(Target::Open);
    }
    let Some(namespace) = namespace else {
        return Ok(Target::Global(format!(
            "method {} names no namespace",
            crate::metrics::short_method(m.path)
        )));
    };
    let by_id = |field: &str| -> Result<bool, StringFieldError> {
        Ok(m.request.has_string_field(field)
            && top_level_string_strict(m.request, message, field)?.is_some_and(|v| !v.is_empty()))
    };
    if by_id("namespace_id")?
        || (m.request.name() == "temporal.api.workflowservice.v1.DescribeNamespaceRequest"
            && by_id("id")?)
    {
        return Ok(Target::Global(format!(
            "the {} request names its namespace by id",
            crate::metrics::short_method(m.path)
        )));
    }
    Ok(Target::Namespace(namespace.to_owned()))
}

/// `RespondWorkflowTaskCompletedRequest.commands` and the attributes of the commands that may
/// name another namespace (request-cancel-external, start-child, signal-external), each with
/// `namespace` as field 1. Servers since 1.30.1 refuse cross-namespace commands by default;
/// an operator may turn them on, so the gateway authorizes them.
const COMPLETE_WORKFLOW_TASK: &str =
    "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
const COMMANDS_FIELD: u32 = 2;
const CROSS_NAMESPACE_COMMAND_ATTRIBUTES: [u32; 3] = [9, 12, 13];

/// The namespaces the commands of a workflow task completion name, other than by leaving the
/// field empty (which means the workflow's own). Every occurrence is returned, also those a
/// parser would merge away or a later oneof member would replace: checking more than the
/// server acts on fails safe.
pub fn nested_namespaces(m: Method, message: &[u8]) -> Result<Vec<String>, StringFieldError> {
    let mut found = Vec::new();
    if m.request.name() != COMPLETE_WORKFLOW_TASK {
        return Ok(found);
    }
    for command in len_fields_by_number(message, COMMANDS_FIELD)? {
        for field in CROSS_NAMESPACE_COMMAND_ATTRIBUTES {
            for attributes in len_fields_by_number(command, field)? {
                if let Some(ns) = string_field_by_number(attributes, 1)?
                    && !ns.is_empty()
                {
                    found.push(ns.to_owned());
                }
            }
        }
    }
    Ok(found)
}

/// The server's task tokens (`temporal.server.api.token.v1.Task`, `QueryTask`, `NexusTask`)
/// carry the namespace id as field 1; the server acts on that namespace.
const TASK_TOKEN_NAMESPACE_ID: u32 = 1;

/// The namespace id inside the request's `task_token`, when the request type has one and the
/// request carries it (`Some("")`: a token without an id, which no namespace matches).
pub fn task_namespace_id(m: Method, message: &[u8]) -> Result<Option<String>, StringFieldError> {
    let Some(token) = top_level_bytes(m.request, message, "task_token")? else {
        return Ok(None);
    };
    Ok(Some(
        string_field_by_number(token, TASK_TOKEN_NAMESPACE_ID)?
            .unwrap_or_default()
            .to_owned(),
    ))
}
