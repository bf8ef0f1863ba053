use std::io::Write;

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeNamespaceRequest, RequestCancelWorkflowExecutionRequest, StartWorkflowExecutionRequest,
};

use super::*;
use crate::grpc::frame::{self, Encoding};

const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";
const CANCEL: &str =
    "/temporal.api.workflowservice.v1.WorkflowService/RequestCancelWorkflowExecution";
const LIMIT: usize = 4 << 20;

fn start_request(ns: &str) -> Vec<u8> {
    StartWorkflowExecutionRequest {
        namespace: ns.to_owned(),
        workflow_id: "wf".to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn cancel_request(ns: &str) -> Vec<u8> {
    RequestCancelWorkflowExecutionRequest {
        namespace: ns.to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn decide_body(path: &str, body: Vec<u8>, encoding: Encoding) -> Result<Inspected, IngressError> {
    decide(
        path,
        &Bytes::from(body),
        encoding,
        LIMIT,
        MessageBudget::unlimited(),
    )
}

fn namespace_of(inspected: &Inspected) -> &str {
    match &inspected.target {
        Target::Namespace(ns) => ns,
        other => panic!("not a namespace target: {other:?}"),
    }
}

/// The bytes the ingress forwards for `inspected`, parsed back into messages.
fn forwarded(inspected: &Inspected) -> Vec<Bytes> {
    let chunks = frame::encode(inspected.messages.clone().unwrap()).unwrap();
    let len = chunks.iter().map(Bytes::len).sum();
    let body = frame::join(chunks, len);
    assert_eq!(body[0], 0, "forwarded uncompressed");
    frame::split(
        &body,
        Encoding::Identity,
        LIMIT,
        true,
        &MessageBudget::unlimited(),
    )
    .unwrap()
}

#[test]
fn the_namespace_is_the_request_body_field_last_occurrence_wins() {
    let i = decide_body(START, frame(0, &start_request("a")), Encoding::Identity).unwrap();
    assert_eq!(namespace_of(&i), "a");
    assert_eq!(i.namespace.as_deref(), Some("a"));
    let mut twice = start_request("a");
    twice.extend(start_request("b"));
    let i = decide_body(START, frame(0, &twice), Encoding::Identity).unwrap();
    assert_eq!(namespace_of(&i), "b");
    let i = decide_body(START, frame(0, b""), Encoding::Identity).unwrap();
    assert_eq!(namespace_of(&i), "");
}

#[test]
fn two_gzip_members_are_one_message_and_forwarded_inflated() {
    // The attack of issue 22: gzip(request naming A) ‖ gzip(field 1 = "B").
    let mut members = gzip(&cancel_request("a"));
    members.extend(gzip(&[0x0a, 0x01, b'B']));
    let i = decide_body(CANCEL, frame(1, &members), Encoding::Gzip).unwrap();
    assert_eq!(
        namespace_of(&i),
        "B",
        "every member is read, the last field wins"
    );
    let sent = forwarded(&i);
    let server = RequestCancelWorkflowExecutionRequest::decode(sent[0].as_ref()).unwrap();
    assert_eq!(server.namespace, "B");
}

#[test]
fn a_namespace_with_another_wire_type_is_skipped_as_the_server_skips_it() {
    // field 1 as a string "A", then field 1 as a varint: Go's protobuf keeps "A".
    let message = [0x0a, 0x01, b'A', 0x08, 0x05];
    let i = decide_body(CANCEL, frame(0, &message), Encoding::Identity).unwrap();
    assert_eq!(namespace_of(&i), "A");
}

#[test]
fn unreadable_requests_are_refused_with_a_status_naming_why() {
    let code = |r: Result<Inspected, IngressError>| r.unwrap_err().status().code;
    // Bytes after the only frame.
    let mut trailing = frame(0, &cancel_request("a"));
    trailing.extend_from_slice(&[0x0a, 0x01, b'B']);
    assert_eq!(
        code(decide_body(CANCEL, trailing, Encoding::Identity)),
        Code::InvalidArgument
    );
    // Bytes after the gzip member that are not another member.
    let mut member = gzip(&cancel_request("a"));
    member.extend_from_slice(&[0x0a, 0x01, b'B']);
    assert_eq!(
        code(decide_body(CANCEL, frame(1, &member), Encoding::Gzip)),
        Code::InvalidArgument
    );
    // An empty compressed frame.
    assert_eq!(
        code(decide_body(CANCEL, frame(1, b""), Encoding::Gzip)),
        Code::InvalidArgument
    );
    // No message at all in a unary call.
    assert_eq!(
        code(decide_body(CANCEL, Vec::new(), Encoding::Identity)),
        Code::InvalidArgument
    );
    // A namespace that is not UTF-8, and a top level that is not protobuf.
    assert_eq!(
        code(decide_body(
            CANCEL,
            frame(0, &[0x0a, 0x02, 0xff, 0xfe]),
            Encoding::Identity
        )),
        Code::InvalidArgument
    );
    assert_eq!(
        code(decide_body(
            CANCEL,
            frame(0, &[0x0a, 0x09]),
            Encoding::Identity
        )),
        Code::InvalidArgument
    );
    // An unsupported encoding is named, as gRPC servers answer it.
    let err = Encoding::from_header(Some("snappy")).unwrap_err();
    assert_eq!(IngressError::from(err).status().code, Code::Unimplemented);
}

#[test]
fn paths_a_server_could_dispatch_differently_are_refused() {
    assert!(check_path("/temporal.api.workflowservice.v1.WorkflowService/X", None).is_ok());
    for (path, query) in [
        ("temporal.api.workflowservice.v1.WorkflowService/X", None),
        (
            "/temporal.api.workflowservice.v1.WorkflowService/X",
            Some("a=b"),
        ),
    ] {
        let err = check_path(path, query).unwrap_err();
        assert_eq!(err.status().code, Code::InvalidArgument, "{path}");
    }
}

#[test]
fn namespace_less_and_unknown_methods_are_global_except_the_open_ones() {
    for open in OPEN_METHODS {
        assert_eq!(target::of_path(open), Target::Open, "{open}");
    }
    let unknown = "/temporal.api.workflowservice.v1.WorkflowService/FutureMethod";
    let i = decide_body(unknown, frame(0, b"\x0a\x01a"), Encoding::Identity).unwrap();
    assert!(matches!(i.target, Target::Global(_)));
    assert!(i.method.is_none() && i.namespace.is_none());
    let mut global = Vec::new();
    for m in payload_gateway_proto::methods() {
        let i = decide_body(m.path, frame(0, b""), Encoding::Identity).unwrap();
        match i.target {
            Target::Global(_) => global.push(crate::metrics::short_method(m.path)),
            Target::Open => assert!(!m.request.has_string_field("namespace")),
            Target::Namespace(_) => assert!(m.request.has_string_field("namespace")),
        }
    }
    for expected in [
        "OperatorService/CreateNexusEndpoint",
        "OperatorService/UpdateNexusEndpoint",
        "OperatorService/DeleteNexusEndpoint",
        "OperatorService/GetNexusEndpoint",
        "OperatorService/ListNexusEndpoints",
        "OperatorService/ListClusters",
        "WorkflowService/ListNamespaces",
    ] {
        assert!(
            global.iter().any(|g| g == expected),
            "{expected}: {global:?}"
        );
    }
    // Batch operations and namespace-scoped operator calls name their namespace.
    use temporalio_protos::temporal::api::operatorservice::v1::AddSearchAttributesRequest;
    use temporalio_protos::temporal::api::workflowservice::v1::{
        ExecuteMultiOperationRequest, StartBatchOperationRequest,
    };
    let named = |ns: &str| -> [(&str, Vec<u8>); 3] {
        [
            (
                "/temporal.api.workflowservice.v1.WorkflowService/StartBatchOperation",
                StartBatchOperationRequest {
                    namespace: ns.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "/temporal.api.operatorservice.v1.OperatorService/AddSearchAttributes",
                AddSearchAttributesRequest {
                    namespace: ns.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "/temporal.api.workflowservice.v1.WorkflowService/ExecuteMultiOperation",
                ExecuteMultiOperationRequest {
                    namespace: ns.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ]
    };
    for (path, message) in named("a") {
        let i = decide_body(path, frame(0, &message), Encoding::Identity).unwrap();
        assert_eq!(i.target, Target::Namespace("a".into()), "{path}");
    }
}

#[test]
fn a_namespace_named_by_id_is_global() {
    let path = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
    let by_id = DescribeNamespaceRequest {
        namespace: "a".into(),
        id: "0000-1111".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let i = decide_body(path, frame(0, &by_id), Encoding::Identity).unwrap();
    assert!(matches!(i.target, Target::Global(_)));
    let path = "/temporal.api.operatorservice.v1.OperatorService/DeleteNamespace";
    let by_id = temporalio_protos::temporal::api::operatorservice::v1::DeleteNamespaceRequest {
        namespace: "a".into(),
        namespace_id: "0000-1111".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let i = decide_body(path, frame(0, &by_id), Encoding::Identity).unwrap();
    assert!(matches!(i.target, Target::Global(_)));
}

#[tokio::test]
async fn admit_forwards_exactly_the_inspected_bytes_uncompressed() {
    let ingress = Ingress::new(LIMIT, ProcessBudget::unlimited());
    let mut members = gzip(&cancel_request("a"));
    members.extend(gzip(&[0x0a, 0x01, b'B']));
    let request = Request::post(format!("http://gw{CANCEL}"))
        .header("grpc-encoding", "gzip")
        .body(GatewayBody::buffered(
            vec![Bytes::from(frame(1, &members))],
            None,
        ))
        .unwrap();
    let admitted = ingress.admit(request).await.unwrap();
    assert!(admitted.headers().get("grpc-encoding").is_none());
    let inspected = Inspected::of(&admitted).unwrap().clone();
    assert_eq!(namespace_of(&inspected), "B");
    let body = http_body_util::BodyExt::collect(admitted.into_body())
        .await
        .unwrap()
        .to_bytes();
    let mut expected = vec![0u8];
    let message = inspected.messages.as_ref().unwrap()[0].clone();
    expected.extend_from_slice(&(message.len() as u32).to_be_bytes());
    expected.extend_from_slice(&message);
    assert_eq!(body, expected, "the body is the inspected message, flag 0");
    // A method of another service streams through untouched.
    let request = Request::post("http://gw/grpc.health.v1.Health/Check")
        .header("grpc-encoding", "gzip")
        .body(GatewayBody::buffered(
            vec![Bytes::from_static(b"xyz")],
            None,
        ))
        .unwrap();
    let admitted = ingress.admit(request).await.unwrap();
    assert_eq!(Inspected::of(&admitted).unwrap().target, Target::Open);
    let body = http_body_util::BodyExt::collect(admitted.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, &b"xyz"[..]);
}

/// One protobuf field of a generated request: the namespace as a string, the namespace field
/// number with another wire type, or an unrelated field.
fn field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-c]{0,3}".prop_map(|ns| {
            let mut f = vec![0x0a, ns.len() as u8];
            f.extend_from_slice(ns.as_bytes());
            f
        }),
        any::<u8>().prop_map(|v| vec![0x08, v & 0x7f]),
        any::<[u8; 4]>().prop_map(|v| {
            let mut f = vec![0x0d];
            f.extend_from_slice(&v);
            f
        }),
        "[a-z]{0,4}".prop_map(|s| {
            let mut f = vec![0x12, s.len() as u8];
            f.extend_from_slice(s.as_bytes());
            f
        }),
        proptest::collection::vec(any::<u8>(), 0..4),
    ]
}

/// How the generated message is framed: plain, gzip in `members` members, zlib, plus junk.
#[derive(Debug, Clone)]
enum Wrap {
    Plain,
    Gzip(usize),
    Zlib,
}

fn wrap() -> impl Strategy<Value = Wrap> {
    prop_oneof![
        Just(Wrap::Plain),
        (1usize..4).prop_map(Wrap::Gzip),
        Just(Wrap::Zlib)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For arbitrary bodies and encodings, the namespace the ingress decided equals what a
    /// plain protobuf decode of the bytes it forwards yields, and what it refuses a decode of
    /// the client's bytes could not read the same way.
    #[test]
    fn the_decided_namespace_is_what_the_forwarded_bytes_say(
        fields in proptest::collection::vec(field(), 0..6),
        wrap in wrap(),
        junk in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let message: Vec<u8> = fields.concat();
        let (flag, payload, encoding) = match wrap {
            Wrap::Plain => (0, message.clone(), Encoding::Identity),
            Wrap::Gzip(members) => {
                // Split the message into `members` gzip members.
                let mut out = Vec::new();
                let step = message.len().div_ceil(members).max(1);
                for part in message.chunks(step) {
                    out.extend(gzip(part));
                }
                if out.is_empty() {
                    out = gzip(b"");
                }
                (1, out, Encoding::Gzip)
            }
            Wrap::Zlib => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&message).unwrap();
                (1, e.finish().unwrap(), Encoding::Deflate)
            }
        };
        let mut payload = payload;
        payload.extend_from_slice(&junk);
        let body = frame(flag, &payload);
        match decide_body(CANCEL, body, encoding) {
            Ok(inspected) => {
                let sent = forwarded(&inspected);
                prop_assert_eq!(sent.len(), 1);
                // prost refuses a known field with another wire type, where Go skips it: only
                // compare where a plain decode succeeds.
                if let Ok(server) = RequestCancelWorkflowExecutionRequest::decode(sent[0].as_ref()) {
                    prop_assert_eq!(namespace_of(&inspected), server.namespace.as_str());
                }
            }
            Err(e) => {
                let status = e.status();
                prop_assert!(matches!(status.code, Code::InvalidArgument), "{}", status.message);
            }
        }
    }
}

#[test]
#[allow(deprecated)] // sets the deprecated `namespace` of SignalExternalWorkflowExecutionCommandAttributes on purpose
fn task_tokens_and_cross_namespace_commands_are_decided_with_the_request() {
    use temporalio_protos::temporal::api::command::v1::{
        Command, SignalExternalWorkflowExecutionCommandAttributes, command,
    };
    use temporalio_protos::temporal::api::workflowservice::v1::RespondWorkflowTaskCompletedRequest;
    const COMPLETE: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted";
    // A server task token: field 1 is the namespace id.
    let token = [&[0x0a, 0x04][..], b"id-a", &[0x12, 0x02], b"wf"].concat();
    let signal_b = Command {
        attributes: Some(
            command::Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                SignalExternalWorkflowExecutionCommandAttributes {
                    namespace: "b".into(),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    let request = RespondWorkflowTaskCompletedRequest {
        namespace: "a".into(),
        task_token: token,
        commands: vec![Command::default(), signal_b],
        ..Default::default()
    }
    .encode_to_vec();
    let i = decide_body(COMPLETE, frame(0, &request), Encoding::Identity).unwrap();
    assert_eq!(namespace_of(&i), "a");
    assert_eq!(
        i.task_namespace_id.as_ref().unwrap().as_deref(),
        Some("id-a")
    );
    assert_eq!(i.nested_namespaces.as_ref().unwrap(), &vec!["b".to_owned()]);
    // A token that is not protobuf is decided as unreadable (authorization refuses it).
    let request = RespondWorkflowTaskCompletedRequest {
        namespace: "a".into(),
        task_token: b"token".to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    let i = decide_body(COMPLETE, frame(0, &request), Encoding::Identity).unwrap();
    assert!(i.task_namespace_id.is_err());
}
