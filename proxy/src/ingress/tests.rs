use std::io::Write;

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeNamespaceRequest, RequestCancelWorkflowExecutionRequest, StartWorkflowExecutionRequest,
};

use super::*;
use crate::grpc::frame::tests::{frame, gzip};
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
// The commands' `namespace` fields are deprecated in the API: still what the server reads.
#[allow(deprecated)]
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

// ---- Frames read as the body's chunks arrive (`reader`) ----

use std::time::Duration;

use crate::budget::ProcessBudget as Process;
use flate2::write::DeflateEncoder;

/// A gzip member with every optional header part (extra field, name, comment, header CRC)
/// around `data`, written by hand (RFC 1952): the parts the streaming header parser must
/// read across chunk boundaries.
fn gzip_with_every_header_part(data: &[u8]) -> Vec<u8> {
    let mut header = vec![0x1f, 0x8b, 8, 0b0001_1110, 1, 2, 3, 4, 0, 3];
    header.extend_from_slice(&5u16.to_le_bytes());
    header.extend_from_slice(b"XYxyz");
    header.extend_from_slice(b"name.bin\0");
    header.extend_from_slice(b"a comment\0");
    let mut crc = flate2::Crc::new();
    crc.update(&header);
    header.extend_from_slice(&(crc.sum() as u16).to_le_bytes());
    let mut deflate = DeflateEncoder::new(header, flate2::Compression::default());
    deflate.write_all(data).unwrap();
    let mut out = deflate.finish().unwrap();
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Pseudo-random bytes (incompressible for deflate).
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Reads `body` cut at `cuts` (ascending offsets) with the streaming reader.
fn read_in_chunks(
    body: &[u8],
    cuts: &[usize],
    encoding: Encoding,
    unary: bool,
    budget: &MessageBudget,
) -> Result<Vec<Bytes>, frame::FrameError> {
    let body = Bytes::copy_from_slice(body);
    let mut reader = reader::FrameReader::new(encoding, LIMIT, unary, budget.clone());
    let mut from = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        reader.push(body.slice(from..cut))?;
        from = cut;
    }
    reader.finish()
}

/// What `frame::split` (the whole-body reader, the reference) makes of `body`.
fn split_whole(
    body: &[u8],
    encoding: Encoding,
    unary: bool,
) -> Result<Vec<Bytes>, frame::FrameError> {
    frame::split(
        &Bytes::copy_from_slice(body),
        encoding,
        LIMIT,
        unary,
        &MessageBudget::unlimited(),
    )
}

/// Two gzip members (the first with every header part, the second plain) of one message,
/// and a plain message after it, cut in two at every byte: inside the gRPC prefix, inside
/// the gzip header (fixed part, extra field, name, comment, header CRC), inside the deflate
/// blocks, inside the trailer, exactly between the members, and in the plain message. Also
/// cut into single bytes. Every cut reads the same messages as the whole body does.
#[test]
fn chunk_boundaries_anywhere_read_the_same_messages() {
    let first = noise(700, 7);
    let second: Vec<u8> = b"second member ".repeat(40);
    let one = gzip_with_every_header_part(&first);
    let two = gzip(&second);
    let mut members = one.clone();
    members.extend_from_slice(&two);
    let mut body = frame(1, &members);
    body.extend(frame(1, &gzip(b"third")));
    let expected = vec![[first.clone(), second.clone()].concat(), b"third".to_vec()];
    assert_eq!(split_whole(&body, Encoding::Gzip, false).unwrap(), expected);

    // The named places, in body offsets.
    let header_end = 5 + 10 + 2 + 5 + 9 + 10 + 2;
    let between = 5 + one.len();
    let trailer = between - 8;
    for (what, at) in [
        ("inside the prefix", 3),
        ("inside the fixed header", 5 + 4),
        ("inside the extra field", 5 + 13),
        ("inside the name", 5 + 20),
        ("inside the header CRC", header_end - 1),
        ("at the end of the header", header_end),
        ("inside a deflate block", header_end + 300),
        ("inside the trailer's CRC", trailer + 2),
        ("between CRC and ISIZE", trailer + 4),
        ("inside ISIZE", trailer + 6),
        ("between the members", between),
        ("inside the second member's header", between + 3),
    ] {
        let got = read_in_chunks(
            &body,
            &[at],
            Encoding::Gzip,
            false,
            &MessageBudget::unlimited(),
        );
        assert_eq!(
            got.unwrap_or_else(|e| panic!("{what} ({at}): {e}")),
            expected,
            "{what} ({at})"
        );
    }
    for at in 0..=body.len() {
        let got = read_in_chunks(
            &body,
            &[at],
            Encoding::Gzip,
            false,
            &MessageBudget::unlimited(),
        );
        assert_eq!(got.unwrap(), expected, "cut at {at}");
    }
    let every: Vec<usize> = (1..body.len()).collect();
    assert_eq!(
        read_in_chunks(
            &body,
            &every,
            Encoding::Gzip,
            false,
            &MessageBudget::unlimited()
        )
        .unwrap(),
        expected
    );
    // zlib (`deflate`), cut everywhere.
    let body = frame(1, &zlib(&first));
    for at in 0..=body.len() {
        let got = read_in_chunks(
            &body,
            &[at],
            Encoding::Deflate,
            true,
            &MessageBudget::unlimited(),
        );
        assert_eq!(got.unwrap(), vec![first.clone()], "zlib cut at {at}");
    }
}

/// Every refusal of the whole-body reader is a refusal when the body comes in pieces, at any
/// cut: bytes after the last member, a second frame of a unary call, a CRC, ISIZE or header
/// CRC that does not match, a reserved flag, an empty compressed frame, a body that ends
/// inside a member or a prefix, zlib bytes after the stream.
#[test]
fn refusals_hold_wherever_the_chunks_are_cut() {
    let good = gzip_with_every_header_part(b"payload bytes");
    let mut cases: Vec<(&str, Vec<u8>, Encoding, bool)> = Vec::new();
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0x0a, 0x01, b'B']);
    cases.push((
        "bytes after the member",
        frame(1, &trailing),
        Encoding::Gzip,
        true,
    ));
    let mut two = frame(1, &good);
    two.extend(frame(0, b"x"));
    cases.push(("a second frame of a unary call", two, Encoding::Gzip, true));
    let n = good.len();
    let mut crc = good.clone();
    crc[n - 8] ^= 1;
    cases.push(("CRC mismatch", frame(1, &crc), Encoding::Gzip, true));
    let mut isize = good.clone();
    isize[n - 4] ^= 1;
    cases.push(("ISIZE mismatch", frame(1, &isize), Encoding::Gzip, true));
    let mut hcrc = good.clone();
    hcrc[10 + 2 + 5 + 9 + 10] ^= 1;
    cases.push(("header CRC mismatch", frame(1, &hcrc), Encoding::Gzip, true));
    let mut reserved = good.clone();
    reserved[3] |= 0x80;
    cases.push(("reserved flag", frame(1, &reserved), Encoding::Gzip, true));
    cases.push((
        "empty compressed frame",
        frame(1, b""),
        Encoding::Gzip,
        true,
    ));
    cases.push((
        "cut inside the member",
        frame(1, &good)[..20].to_vec(),
        Encoding::Gzip,
        true,
    ));
    let mut short = frame(1, &good);
    short.truncate(short.len() - 3);
    cases.push(("cut inside the trailer", short, Encoding::Gzip, true));
    cases.push((
        "cut inside the prefix",
        vec![0, 0, 0],
        Encoding::Identity,
        true,
    ));
    cases.push((
        "flag 1 without an encoding",
        frame(1, &good),
        Encoding::Identity,
        true,
    ));
    cases.push(("an invalid flag", frame(2, b"x"), Encoding::Gzip, true));
    let mut after = zlib(b"first");
    after.extend_from_slice(b"\x0a\x01B");
    cases.push((
        "zlib bytes after the stream",
        frame(1, &after),
        Encoding::Deflate,
        true,
    ));
    let mut adler = zlib(b"first");
    let last = adler.len() - 1;
    adler[last] ^= 1;
    cases.push((
        "zlib Adler-32 mismatch",
        frame(1, &adler),
        Encoding::Deflate,
        true,
    ));
    for (what, body, encoding, unary) in cases {
        let whole = split_whole(&body, encoding, unary).unwrap_err();
        let kind = std::mem::discriminant(&whole);
        let code = IngressError::Frame(whole).status().code;
        for at in 0..=body.len() {
            let err = read_in_chunks(&body, &[at], encoding, unary, &MessageBudget::unlimited())
                .unwrap_err();
            assert_eq!(
                std::mem::discriminant(&err),
                kind,
                "{what}, cut at {at}: {err}"
            );
            assert_eq!(IngressError::Frame(err).status().code, code, "{what}");
        }
    }
}

/// `data` as one zlib stream (`grpc-encoding: deflate`).
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The output buffer is sized from the compressed length and grown only as needed: an
/// incompressible message is charged its compressed length once (no growth), a
/// compressible one at most twice its inflated size; and the compressed bytes themselves
/// are not held once inflated.
#[tokio::test]
async fn inflation_is_sized_from_the_compressed_length_and_grows_within_twice() {
    use temporalio_protos::temporal::api::common::v1::{Payload, Payloads};
    for (what, payload) in [
        ("incompressible", noise(3 << 20, 3)),
        (
            "compressible",
            b"{\"k\": 12345, \"v\": \"abcdef\"} ".repeat(100_000),
        ),
    ] {
        let data = StartWorkflowExecutionRequest {
            namespace: "default".to_owned(),
            input: Some(Payloads {
                payloads: vec![Payload {
                    data: payload,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let compressed = gzip(&data);
        let body = Bytes::from(frame(1, &compressed));
        let process = Process::new(0);
        let ingress = Ingress::new(LIMIT, process.clone());
        let chunks: Vec<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        let request = Request::post(format!("http://gw{START}"))
            .header("grpc-encoding", "gzip")
            .body(GatewayBody::buffered(chunks, None))
            .unwrap();
        let admitted = ingress.admit(request).await.unwrap();
        let inspected = Inspected::of(&admitted).unwrap();
        assert_eq!(inspected.messages.as_ref().unwrap()[0], data, "{what}");
        let charged = inspected.budget.used();
        assert!(charged >= data.len(), "{what}: {charged}");
        if what == "incompressible" {
            assert_eq!(
                charged,
                compressed.len(),
                "{what}: sized once, from the compressed length"
            );
        } else {
            assert!(
                charged <= 2 * data.len(),
                "{what}: {charged} for {}",
                data.len()
            );
        }
        assert_eq!(
            process.in_use(),
            charged,
            "{what}: nothing of the compressed body held"
        );
    }
}

/// A request body that arrives as the test sends it; the sender may stay open.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// A gzip bomb (64 MiB of zeros in 64 KiB) against a 4 MiB limit is refused as soon as its
/// inflation passes the limit, while the client is still sending: the rest of the body is
/// never waited for, and no more than the limit was charged.
#[tokio::test]
async fn a_gzip_bomb_is_refused_before_the_body_is_read() {
    let bomb = gzip(&vec![0u8; 64 << 20]);
    let body = frame(1, &bomb);
    let (send, receive) = tokio::sync::mpsc::channel(1024);
    // Only the first half is sent; the sender stays open (a client still sending).
    for piece in body[..body.len() / 2].chunks(1024) {
        send.send(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    let process = Process::new(0);
    let ingress = Ingress::new(LIMIT, process.clone());
    let request = Request::post(format!("http://gw{START}"))
        .header("grpc-encoding", "gzip")
        .body(GatewayBody::new(ChannelBody(receive)))
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), ingress.admit(request))
        .await
        .expect("refused without waiting for the rest of the body")
        .unwrap_err();
    let status = refused.status();
    assert_eq!(status.code, Code::ResourceExhausted, "{}", status.message);
    assert!(
        status
            .message
            .contains("exceeds the limit of 4194304 bytes"),
        "{}",
        status.message
    );
    assert_eq!(
        process.in_use(),
        0,
        "the refused request's charges are returned"
    );
    drop(send);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary frames (plain, gzip in several members, zlib, with or without junk after
    /// them) cut into arbitrary chunks: the streaming reader reads what the whole-body
    /// reader reads, or refuses with the same kind of error and status.
    #[test]
    fn streaming_reads_what_the_whole_body_reader_reads(
        messages in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), 0usize..4), 1..4),
        junk in proptest::collection::vec(any::<u8>(), 0..3),
        gzip_encoding in any::<bool>(),
        unary in any::<bool>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let encoding = if gzip_encoding { Encoding::Gzip } else { Encoding::Deflate };
        let mut body = Vec::new();
        for (data, members) in &messages {
            let payload = match (members, gzip_encoding) {
                (0, _) => { body.extend(frame(0, data)); continue; }
                (_, true) => {
                    let step = data.len().div_ceil(*members).max(1);
                    let mut out: Vec<u8> = data.chunks(step).flat_map(gzip).collect();
                    if out.is_empty() { out = gzip(b""); }
                    out
                }
                (_, false) => zlib(data),
            };
            body.extend(frame(1, &payload));
        }
        body.extend_from_slice(&junk);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let whole = split_whole(&body, encoding, unary);
        let streamed = read_in_chunks(&body, &cuts, encoding, unary, &MessageBudget::unlimited());
        match (whole, streamed) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => {
                prop_assert_eq!(std::mem::discriminant(&a), std::mem::discriminant(&b), "{} / {}", a, b);
            }
            (a, b) => prop_assert!(false, "whole {:?}, streamed {:?}", a, b),
        }
    }
}
