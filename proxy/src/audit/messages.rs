//! The parts of the Temporal frontend's list and history messages the audit reads. prost
//! skips the fields not declared here, and history events are kept as raw bytes so the
//! payload walker sees them exactly as the server stored them.

use bytes::Bytes;

/// `temporal.api.workflowservice.v1.ListNamespacesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListNamespacesRequest {
    #[prost(int32, tag = "1")]
    pub page_size: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub next_page_token: Vec<u8>,
}

/// `temporal.api.workflowservice.v1.ListNamespacesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListNamespacesResponse {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<DescribeNamespaceResponse>,
    #[prost(bytes = "vec", tag = "2")]
    pub next_page_token: Vec<u8>,
}

/// `temporal.api.workflowservice.v1.DescribeNamespaceResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct DescribeNamespaceResponse {
    #[prost(message, optional, tag = "1")]
    pub namespace_info: Option<NamespaceInfo>,
}

/// `temporal.api.namespace.v1.NamespaceInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct NamespaceInfo {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `temporal.api.workflowservice.v1.ListWorkflowExecutionsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListWorkflowExecutionsRequest {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(int32, tag = "2")]
    pub page_size: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub next_page_token: Vec<u8>,
    #[prost(string, tag = "4")]
    pub query: String,
}

/// `temporal.api.workflowservice.v1.ListWorkflowExecutionsResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ListWorkflowExecutionsResponse {
    #[prost(message, repeated, tag = "1")]
    pub executions: Vec<WorkflowExecutionInfo>,
    #[prost(bytes = "vec", tag = "2")]
    pub next_page_token: Vec<u8>,
}

/// `temporal.api.workflow.v1.WorkflowExecutionInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct WorkflowExecutionInfo {
    #[prost(message, optional, tag = "1")]
    pub execution: Option<WorkflowExecution>,
}

/// `temporal.api.common.v1.WorkflowExecution`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub(super) struct WorkflowExecution {
    #[prost(string, tag = "1")]
    pub workflow_id: String,
    #[prost(string, tag = "2")]
    pub run_id: String,
}

/// `temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct GetWorkflowExecutionHistoryRequest {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(message, optional, tag = "2")]
    pub execution: Option<WorkflowExecution>,
    #[prost(int32, tag = "3")]
    pub maximum_page_size: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub next_page_token: Vec<u8>,
    #[prost(bool, tag = "7")]
    pub skip_archival: bool,
}

/// `temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct GetWorkflowExecutionHistoryResponse {
    #[prost(message, optional, tag = "1")]
    pub history: Option<History>,
    #[prost(bytes = "vec", tag = "3")]
    pub next_page_token: Vec<u8>,
}

/// `temporal.api.history.v1.History`, each event left serialized.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct History {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub events: Vec<Bytes>,
}

/// The head of `temporal.api.history.v1.HistoryEvent`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct HistoryEventHead {
    #[prost(int64, tag = "1")]
    pub event_id: i64,
    #[prost(message, optional, tag = "2")]
    pub event_time: Option<Timestamp>,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub(super) struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}
