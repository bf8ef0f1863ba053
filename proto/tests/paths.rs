//! One test per path class, built with the `temporalio-protos` prost types, plus malformed
//! input and helper lookups.

use bytes::Bytes;
use payload_gateway_proto::{MAX_DEPTH, MessageType, WalkError, method, scan, top_level_string};
use prost::Message;
use temporalio_protos::protos::temporal::api::{
    command::v1 as command,
    common::v1::{Header, Memo, Payload, Payloads, SearchAttributes},
    failure::v1 as failure,
    history::v1 as history,
    nexus::v1 as nexus,
    protocol::v1 as protocol,
    sdk::v1::UserMetadata,
    update::v1 as update,
    workflowservice::v1 as ws,
};

fn p(data: &str) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: data.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn ps(data: &[&str]) -> Payloads {
    Payloads {
        payloads: data.iter().map(|d| p(d)).collect(),
    }
}

/// Scans `m` as `name`, returns `(path, payload data)` per site, and checks the marking
/// splice round trip.
fn sites<M: Message + Default>(name: &str, m: &M) -> Vec<(String, String)> {
    let ty = MessageType::by_name(name).unwrap();
    let bytes = Bytes::from(m.encode_to_vec());
    let s = scan(ty, &bytes).unwrap();
    let out: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let p = Payload::decode(&bytes[x.range()]).unwrap();
            (
                x.path().to_string(),
                String::from_utf8_lossy(&p.data).into_owned(),
            )
        })
        .collect();
    // Replace every site with a longer payload: still decodes, sites hold the new data.
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let mut p = Payload::decode(&bytes[x.range()]).unwrap();
            p.data.extend_from_slice(&[b'#'; 200]);
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let spliced = s.splice(&bytes, &reps).unwrap();
    M::decode(spliced.clone()).expect("spliced message decodes");
    let again = scan(ty, &spliced).unwrap();
    assert_eq!(again.sites().len(), s.sites().len());
    for x in again.sites() {
        assert!(spliced[x.range()].ends_with(&[b'#'; 200]));
    }
    out
}

fn has(sites: &[(String, String)], path: &str, data: &str) -> bool {
    sites.iter().any(|(p, d)| p == path && d == data)
}

fn any<M: Message>(m: &M, ty: &str) -> protocol::Message {
    let mut msg = protocol::Message {
        id: "m1".into(),
        protocol_instance_id: "u1".into(),
        ..Default::default()
    };
    let mut body = msg.body.take().unwrap_or_default();
    body.type_url = format!("type.googleapis.com/{ty}");
    body.value = m.encode_to_vec();
    msg.body = Some(body);
    msg
}

fn header(k: &str, v: &str) -> Header {
    Header {
        fields: [(k.to_string(), p(v))].into(),
    }
}

#[test]
fn update_args_and_results_inside_protocol_messages() {
    let req = update::Request {
        input: Some(update::Input {
            header: Some(header("h", "update-header")),
            name: "upd".into(),
            args: Some(ps(&["arg1", "arg2"])),
        }),
        ..Default::default()
    };
    let poll = ws::PollWorkflowTaskQueueResponse {
        messages: vec![any(&req, "temporal.api.update.v1.Request")],
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
        &poll,
    );
    assert_eq!(s.len(), 3, "{s:?}");
    assert!(has(
        &s,
        "messages.body[temporal.api.update.v1.Request].input.args.payloads",
        "arg1"
    ));
    assert!(has(
        &s,
        "messages.body[temporal.api.update.v1.Request].input.args.payloads",
        "arg2"
    ));
    assert!(has(
        &s,
        "messages.body[temporal.api.update.v1.Request].input.header.fields",
        "update-header"
    ));

    let resp = update::Response {
        outcome: Some(update::Outcome {
            value: Some(update::outcome::Value::Success(ps(&["result"]))),
        }),
        ..Default::default()
    };
    let rej = update::Rejection {
        failure: Some(failure::Failure {
            message: "no".into(),
            encoded_attributes: Some(p("rejected")),
            ..Default::default()
        }),
        ..Default::default()
    };
    let done = ws::RespondWorkflowTaskCompletedRequest {
        messages: vec![
            any(&resp, "temporal.api.update.v1.Response"),
            any(&rej, "temporal.api.update.v1.Rejection"),
        ],
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
        &done,
    );
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(has(
        &s,
        "messages.body[temporal.api.update.v1.Response].outcome.success.payloads",
        "result"
    ));
    assert!(has(
        &s,
        "messages.body[temporal.api.update.v1.Rejection].failure.encoded_attributes",
        "rejected"
    ));
}

#[test]
fn any_type_url_after_value_and_unknown_any() {
    let req = update::Request {
        input: Some(update::Input {
            args: Some(ps(&["late-url"])),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Any with value (2) before type_url (1), written by hand.
    let value = req.encode_to_vec();
    let url = b"type.googleapis.com/temporal.api.update.v1.Request";
    let mut body = vec![0x12];
    prost::encoding::encode_varint(value.len() as u64, &mut body);
    body.extend_from_slice(&value);
    body.push(0x0a);
    body.push(url.len() as u8);
    body.extend_from_slice(url);
    let mut msg = vec![0x2a]; // protocol.v1.Message.body = 5
    prost::encoding::encode_varint(body.len() as u64, &mut msg);
    msg.extend_from_slice(&body);
    let mut poll = vec![0x7a]; // PollWorkflowTaskQueueResponse.messages = 15
    prost::encoding::encode_varint(msg.len() as u64, &mut poll);
    poll.extend_from_slice(&msg);
    let ty = MessageType::by_name("temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse")
        .unwrap();
    let decoded = ws::PollWorkflowTaskQueueResponse::decode(poll.as_slice()).unwrap();
    assert_eq!(
        decoded.messages.len(),
        1,
        "hand-encoded field numbers are right"
    );
    let s = scan(ty, &poll).unwrap();
    assert_eq!(s.sites().len(), 1);
    assert_eq!(s.unknown_any(), 0);

    // Unknown type: not a site, counted and recorded.
    let mut unknown = any(&req, "example.v1.NotInTheSet");
    unknown.id = "x".into();
    let poll = ws::PollWorkflowTaskQueueResponse {
        messages: vec![unknown],
        ..Default::default()
    };
    let bytes = poll.encode_to_vec();
    let s = scan(ty, &bytes).unwrap();
    assert_eq!(s.sites().len(), 0);
    assert_eq!(s.unknown_any(), 1);
    assert_eq!(
        s.unknown_anys(),
        &[payload_gateway_proto::UnknownAny {
            type_name: "example.v1.NotInTheSet".into(),
            path: "messages.body".into(),
        }]
    );
}

#[test]
fn nexus_operation_input_and_output() {
    let cmd = command::Command {
        attributes: Some(
            command::command::Attributes::ScheduleNexusOperationCommandAttributes(
                command::ScheduleNexusOperationCommandAttributes {
                    endpoint: "my-endpoint".into(),
                    service: "svc".into(),
                    operation: "op".into(),
                    input: Some(p("nexus-input")),
                    nexus_header: [("k".to_string(), "v".to_string())].into(),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    let done = ws::RespondWorkflowTaskCompletedRequest {
        commands: vec![cmd],
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
        &done,
    );
    assert_eq!(
        s,
        vec![(
            "commands.schedule_nexus_operation_command_attributes.input".to_string(),
            "nexus-input".to_string()
        )]
    );

    let resp = ws::RespondNexusTaskCompletedRequest {
        namespace: "ns".into(),
        response: Some(nexus::Response {
            variant: Some(nexus::response::Variant::StartOperation(
                nexus::StartOperationResponse {
                    variant: Some(nexus::start_operation_response::Variant::SyncSuccess(
                        nexus::start_operation_response::Sync {
                            payload: Some(p("nexus-output")),
                            ..Default::default()
                        },
                    )),
                },
            )),
        }),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RespondNexusTaskCompletedRequest",
        &resp,
    );
    assert_eq!(
        s,
        vec![(
            "response.start_operation.sync_success.payload".to_string(),
            "nexus-output".to_string()
        )]
    );

    let poll = ws::PollNexusTaskQueueResponse {
        request: Some(nexus::Request {
            variant: Some(nexus::request::Variant::StartOperation(
                nexus::StartOperationRequest {
                    payload: Some(p("nexus-start")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.PollNexusTaskQueueResponse",
        &poll,
    );
    assert_eq!(
        s,
        vec![(
            "request.start_operation.payload".to_string(),
            "nexus-start".to_string()
        )]
    );
}

/// The system Nexus endpoint's input is an envelope: its inner payloads are the sites.
#[test]
fn system_nexus_envelope_and_system_payload() {
    let inner = ws::SignalWithStartWorkflowExecutionRequest {
        namespace: "ns".into(),
        input: Some(ps(&["inner-start"])),
        signal_input: Some(ps(&["inner-signal"])),
        ..Default::default()
    };
    let envelope = Payload {
        metadata: [
            ("encoding".to_string(), b"binary/protobuf".to_vec()),
            (
                "messageType".to_string(),
                b"temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest".to_vec(),
            ),
        ]
        .into(),
        data: inner.encode_to_vec(),
        ..Default::default()
    };
    let attrs = |endpoint: &str| command::ScheduleNexusOperationCommandAttributes {
        input: Some(envelope.clone()),
        endpoint: endpoint.into(),
        service: "WorkflowService".into(),
        operation: "SignalWithStartWorkflowExecution".into(),
        ..Default::default()
    };
    let done = |endpoint: &str| ws::RespondWorkflowTaskCompletedRequest {
        commands: vec![command::Command {
            attributes: Some(
                command::command::Attributes::ScheduleNexusOperationCommandAttributes(attrs(
                    endpoint,
                )),
            ),
            ..Default::default()
        }],
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
    let s = sites(name, &done("__temporal_system"));
    let prefix = "commands.schedule_nexus_operation_command_attributes.input[temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest]";
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(has(&s, &format!("{prefix}.input.payloads"), "inner-start"));
    assert!(has(
        &s,
        &format!("{prefix}.signal_input.payloads"),
        "inner-signal"
    ));
    // An ordinary endpoint: the input is one opaque payload.
    let s = sites(name, &done("user-endpoint"));
    assert_eq!(s.len(), 1);

    // The scheduled event in history, endpoint encoded after the input.
    let ev = history::NexusOperationScheduledEventAttributes {
        input: Some(envelope.clone()),
        endpoint: "__temporal_system".into(),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.history.v1.NexusOperationScheduledEventAttributes",
        &ev,
    );
    assert_eq!(s.len(), 2, "{s:?}");

    // A payload marked as a system payload anywhere (here: a query result).
    let mut marked = envelope.clone();
    marked
        .metadata
        .insert("__temporal_system_payload".into(), b"true".to_vec());
    let q = ws::QueryWorkflowResponse {
        query_result: Some(Payloads {
            payloads: vec![marked.clone()],
        }),
        ..Default::default()
    };
    let s = sites("temporal.api.workflowservice.v1.QueryWorkflowResponse", &q);
    assert_eq!(s.len(), 2, "{s:?}");
    // Marked, but an older server's plain result (no messageType, not protobuf): ordinary.
    let old = Payload {
        metadata: [
            ("__temporal_system_payload".to_string(), b"true".to_vec()),
            ("encoding".to_string(), b"json/plain".to_vec()),
        ]
        .into(),
        data: b"plain".to_vec(),
        ..Default::default()
    };
    let q = ws::QueryWorkflowResponse {
        query_result: Some(Payloads {
            payloads: vec![old],
        }),
        ..Default::default()
    };
    assert_eq!(
        sites("temporal.api.workflowservice.v1.QueryWorkflowResponse", &q).len(),
        1
    );
    // An envelope of an unknown type: cannot be opened, so it is an ordinary site (encoded
    // whole), and counted.
    let mut bad = marked;
    bad.metadata
        .insert("messageType".into(), b"example.Nope".to_vec());
    let q = ws::QueryWorkflowResponse {
        query_result: Some(Payloads {
            payloads: vec![bad],
        }),
        ..Default::default()
    };
    let bytes = q.encode_to_vec();
    let ty = MessageType::by_name("temporal.api.workflowservice.v1.QueryWorkflowResponse").unwrap();
    let s = scan(ty, &bytes).unwrap();
    assert_eq!((s.sites().len(), s.opaque_system_payloads()), (1, 1));
    assert_eq!(s.sites()[0].path().to_string(), "query_result.payloads");
}

#[test]
fn query_results() {
    let q = ws::QueryWorkflowResponse {
        query_result: Some(ps(&["q1"])),
        ..Default::default()
    };
    let s = sites("temporal.api.workflowservice.v1.QueryWorkflowResponse", &q);
    assert_eq!(
        s,
        vec![("query_result.payloads".to_string(), "q1".to_string())]
    );
    let r = ws::RespondQueryTaskCompletedRequest {
        query_result: Some(ps(&["q2"])),
        namespace: "ns".into(),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest",
        &r,
    );
    assert_eq!(
        s,
        vec![("query_result.payloads".to_string(), "q2".to_string())]
    );
}

#[test]
fn heartbeat_details() {
    let h = ws::RecordActivityTaskHeartbeatRequest {
        task_token: b"opaque-token".to_vec(),
        details: Some(ps(&["beat"])),
        namespace: "ns".into(),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RecordActivityTaskHeartbeatRequest",
        &h,
    );
    assert_eq!(
        s,
        vec![("details.payloads".to_string(), "beat".to_string())]
    );
}

fn start_request() -> ws::StartWorkflowExecutionRequest {
    ws::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: "wf-1".into(),
        input: Some(ps(&["in"])),
        memo: Some(Memo {
            fields: [("m".to_string(), p("memo"))].into(),
        }),
        header: Some(header("h", "hdr")),
        search_attributes: Some(SearchAttributes {
            indexed_fields: [("CustomKeywordField".to_string(), p("\"indexed\""))].into(),
        }),
        user_metadata: Some(UserMetadata {
            summary: Some(p("summary")),
            details: Some(p("details")),
        }),
        ..Default::default()
    }
}

#[test]
fn memo_headers_user_metadata_but_not_search_attributes() {
    let s = sites(
        "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
        &start_request(),
    );
    let mut want = vec![
        ("input.payloads", "in"),
        ("memo.fields", "memo"),
        ("header.fields", "hdr"),
        ("user_metadata.summary", "summary"),
        ("user_metadata.details", "details"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect::<Vec<_>>();
    let mut got = s.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(
        !MessageType::by_name("temporal.api.common.v1.SearchAttributes")
            .unwrap()
            .can_hold_payloads()
    );
}

#[test]
fn failure_details_with_cause_chain() {
    let mut f = failure::Failure {
        message: "root".into(),
        encoded_attributes: Some(p("attrs0")),
        failure_info: Some(failure::failure::FailureInfo::ApplicationFailureInfo(
            failure::ApplicationFailureInfo {
                r#type: "E".into(),
                details: Some(ps(&["details0"])),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    for i in 1..=3 {
        f = failure::Failure {
            message: format!("level {i}"),
            cause: Some(Box::new(f)),
            failure_info: Some(failure::failure::FailureInfo::ApplicationFailureInfo(
                failure::ApplicationFailureInfo {
                    details: Some(ps(&[&format!("details{i}")])),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
    }
    let req = ws::RespondActivityTaskFailedRequest {
        failure: Some(f),
        last_heartbeat_details: Some(ps(&["hb"])),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest",
        &req,
    );
    assert_eq!(s.len(), 6, "{s:?}");
    assert!(has(
        &s,
        "failure.application_failure_info.details.payloads",
        "details3"
    ));
    assert!(has(
        &s,
        "failure.cause.cause.cause.application_failure_info.details.payloads",
        "details0"
    ));
    assert!(has(
        &s,
        "failure.cause.cause.cause.encoded_attributes",
        "attrs0"
    ));
    assert!(has(&s, "last_heartbeat_details.payloads", "hb"));
}

#[test]
fn grpc_status_details_with_multi_operation_failure() {
    use temporalio_protos::protos::google::rpc::Status;
    use temporalio_protos::protos::temporal::api::errordetails::v1 as ed;
    let mut status = Status {
        code: 9,
        message: "multi op failed".into(),
        ..Default::default()
    };
    let f = ed::MultiOperationExecutionFailure {
        statuses: vec![ed::multi_operation_execution_failure::OperationStatus {
            code: 6,
            message: "x".into(),
            details: vec![{
                let m = any(
                    &failure::Failure {
                        encoded_attributes: Some(p("inner-failure")),
                        ..Default::default()
                    },
                    "temporal.api.failure.v1.Failure",
                );
                m.body.unwrap()
            }],
        }],
    };
    let mut d = any(
        &f,
        "temporal.api.errordetails.v1.MultiOperationExecutionFailure",
    )
    .body
    .unwrap();
    d.type_url =
        "type.googleapis.com/temporal.api.errordetails.v1.MultiOperationExecutionFailure".into();
    status.details.push(d);
    let s = sites("google.rpc.Status", &status);
    assert_eq!(
        s,
        vec![(
            "details[temporal.api.errordetails.v1.MultiOperationExecutionFailure].statuses.details[temporal.api.failure.v1.Failure].encoded_attributes".to_string(),
            "inner-failure".to_string()
        )]
    );
}

#[test]
fn history_in_poll_response() {
    let ev = |id: i64, input: &str| history::HistoryEvent {
        event_id: id,
        attributes: Some(
            history::history_event::Attributes::WorkflowExecutionStartedEventAttributes(
                history::WorkflowExecutionStartedEventAttributes {
                    input: Some(ps(&[input])),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    let poll = ws::PollWorkflowTaskQueueResponse {
        task_token: b"tok".to_vec(),
        history: Some(history::History {
            events: vec![ev(1, "e1"), ev(2, "e2")],
        }),
        ..Default::default()
    };
    let s = sites(
        "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
        &poll,
    );
    let path = "history.events.workflow_execution_started_event_attributes.input.payloads";
    assert_eq!(
        s,
        vec![
            (path.to_string(), "e1".to_string()),
            (path.to_string(), "e2".to_string())
        ]
    );
}

#[test]
fn duplicate_message_fields_are_each_visited() {
    // input (field 5) twice: both occurrences are walked (they merge on decode).
    let a = ws::StartWorkflowExecutionRequest {
        input: Some(ps(&["first"])),
        ..Default::default()
    }
    .encode_to_vec();
    let b = ws::StartWorkflowExecutionRequest {
        input: Some(ps(&["second"])),
        ..Default::default()
    }
    .encode_to_vec();
    let both = [a, b].concat();
    let ty = MessageType::by_name("temporal.api.workflowservice.v1.StartWorkflowExecutionRequest")
        .unwrap();
    let s = scan(ty, &both).unwrap();
    assert_eq!(s.sites().len(), 2);
    let merged = ws::StartWorkflowExecutionRequest::decode(both.as_slice()).unwrap();
    assert_eq!(merged.input.unwrap().payloads.len(), 2);
}

#[test]
fn identity_splice_is_zero_copy() {
    let bytes = Bytes::from(start_request().encode_to_vec());
    let ty = MessageType::by_name("temporal.api.workflowservice.v1.StartWorkflowExecutionRequest")
        .unwrap();
    let s = scan(ty, &bytes).unwrap();
    let out = s.splice(&bytes, &vec![None; s.sites().len()]).unwrap();
    assert_eq!(out.as_ptr(), bytes.as_ptr());
    assert!(matches!(
        s.splice(&bytes, &[]),
        Err(WalkError::ReplacementCount { .. })
    ));
}

#[test]
fn malformed_inputs_are_errors() {
    let ty = MessageType::by_name("temporal.api.workflowservice.v1.StartWorkflowExecutionRequest")
        .unwrap();
    let good = start_request().encode_to_vec();
    // Every truncation is an error or a shorter valid message, never a panic.
    for n in 0..good.len() {
        let _ = scan(ty, &good[..n]);
    }
    assert!(matches!(
        scan(ty, &good[..good.len() - 1]),
        Err(WalkError::Truncated { .. } | WalkError::LengthOutOfBounds { .. })
    ));
    // Length beyond the buffer, with offset and path.
    let e = scan(ty, &[0x2a, 0x05, 0x0a]).unwrap_err(); // input (5), len 5, 1 byte
    assert!(
        matches!(
            e,
            WalkError::LengthOutOfBounds {
                len: 5,
                offset: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = scan(ty, &[0x2a, 0x03, 0x0a, 0x09, 0x00]).unwrap_err(); // payloads entry too long
    // The path is that of the message whose field is malformed.
    assert_eq!(e.path(), Some("input"), "{e}");
    // Bad varint.
    assert!(matches!(
        scan(
            ty,
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        ),
        Err(WalkError::BadVarint { .. })
    ));
    // Invalid wire types 6/7 and field 0.
    assert!(matches!(
        scan(ty, &[0x0e]),
        Err(WalkError::InvalidWireType { wire_type: 6, .. })
    ));
    assert!(matches!(
        scan(ty, &[0x0f]),
        Err(WalkError::InvalidWireType { wire_type: 7, .. })
    ));
    assert!(matches!(
        scan(ty, &[0x02, 0x00]),
        Err(WalkError::InvalidWireType { field: 0, .. })
    ));
    // A payload-bearing field with a scalar wire type.
    assert!(matches!(
        scan(ty, &[0x28, 0x01]),
        Err(WalkError::UnexpectedWireType { field: 5, .. })
    ));
}

#[test]
fn too_deep_is_an_error() {
    // Failure.cause (field 4) nested far beyond MAX_DEPTH.
    let ty = MessageType::by_name("temporal.api.failure.v1.Failure").unwrap();
    let mut buf: Vec<u8> = Vec::new();
    for _ in 0..(MAX_DEPTH + 10) {
        let mut outer = vec![0x22];
        prost::encoding::encode_varint(buf.len() as u64, &mut outer);
        outer.extend_from_slice(&buf);
        buf = outer;
    }
    let e = scan(ty, &buf).unwrap_err();
    assert!(
        matches!(
            e,
            WalkError::TooDeep {
                limit: MAX_DEPTH,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.path().unwrap().starts_with("cause.cause.cause"));
    // Deep unknown groups too.
    let mut g = vec![0x0b_u8; 500]; // start group field 1, repeatedly
    g.extend(vec![0x0c_u8; 500]);
    assert!(matches!(scan(ty, &g), Err(WalkError::TooDeep { .. })));
    // Within the limit is fine.
    let mut ok: Vec<u8> = Vec::new();
    for _ in 0..(MAX_DEPTH - 2) {
        let mut outer = vec![0x22];
        prost::encoding::encode_varint(ok.len() as u64, &mut outer);
        outer.extend_from_slice(&ok);
        ok = outer;
    }
    scan(ty, &ok).unwrap();
}

#[test]
fn lookups() {
    let m =
        method("/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution").unwrap();
    assert_eq!(
        m.request.name(),
        "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest"
    );
    assert_eq!(
        m.response.name(),
        "temporal.api.workflowservice.v1.StartWorkflowExecutionResponse"
    );
    assert!(
        method("/temporal.api.operatorservice.v1.OperatorService/ListNexusEndpoints").is_some()
    );
    assert!(method("/grpc.health.v1.Health/Check").is_some());
    assert!(method("/temporal.api.testservice.v1.TestService/UnlockTimeSkipping").is_some());
    assert!(method("/temporal.api.cloud.cloudservice.v1.CloudService/GetNamespace").is_some());
    assert!(method("/nope.Service/Method").is_none());
    let status = MessageType::by_name("google.rpc.Status").unwrap();
    assert!(status.can_hold_payloads());
    assert_eq!(
        MessageType::by_name(".google.protobuf.Any"),
        Some(MessageType::ANY)
    );
    assert_eq!(
        MessageType::PAYLOAD.name(),
        "temporal.api.common.v1.Payload"
    );
    assert!(
        MessageType::by_name("temporal.api.common.v1.WorkflowExecution")
            .is_some_and(|t| !t.can_hold_payloads())
    );

    let req = start_request();
    let mut bytes = req.encode_to_vec();
    assert_eq!(
        top_level_string(m.request, &bytes, "namespace"),
        Some("default")
    );
    assert_eq!(
        top_level_string(m.request, &bytes, "workflow_id"),
        Some("wf-1")
    );
    assert_eq!(top_level_string(m.request, &bytes, "input"), None);
    assert_eq!(top_level_string(m.request, &bytes, "no_such_field"), None);
    // Last occurrence wins.
    bytes.extend_from_slice(&[0x0a, 0x03, b'n', b's', b'2']);
    assert_eq!(
        top_level_string(m.request, &bytes, "namespace"),
        Some("ns2")
    );
    assert_eq!(
        top_level_string(m.request, &bytes[..bytes.len() - 1], "namespace"),
        None
    );
}

#[test]
fn every_method_type_is_known() {
    let n = payload_gateway_proto::methods().count();
    assert!(n > 150, "{n} methods");
    let types = payload_gateway_proto::fuzzing::fuzz_types();
    assert!(
        types.len() <= 256,
        "the fuzz selector byte must reach every type ({})",
        types.len()
    );
}
