//! Sealed failures through the rewrite layer in process, with a real codec, in front of an
//! upstream that records what it receives and answers with a chosen response.

use std::collections::HashMap;

use http::HeaderMap;
use http_body_util::BodyExt;
use payload_gateway::codec::PayloadCodec;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{Payload, Payloads};
use temporalio_protos::temporal::api::failure::v1::{
    ApplicationFailureInfo, Failure, failure::FailureInfo,
};
use temporalio_protos::temporal::api::history::v1::{
    History, HistoryEvent, WorkflowExecutionFailedEventAttributes, history_event::Attributes,
};
use temporalio_protos::temporal::api::workflowservice::v1::{
    GetWorkflowExecutionHistoryRequest, GetWorkflowExecutionHistoryResponse,
    RespondActivityTaskFailedRequest,
};

mod common;
use common::upstream::{RecordingUpstream, call, codec, contains, frame, layer, unframe};

const FAILED: &str = "/temporal.api.workflowservice.v1.WorkflowService/RespondActivityTaskFailed";
const HISTORY: &str =
    "/temporal.api.workflowservice.v1.WorkflowService/GetWorkflowExecutionHistory";

fn failure(message: &str, stack: &str, cause: Option<Failure>) -> Failure {
    Failure {
        message: message.to_owned(),
        stack_trace: stack.to_owned(),
        source: "PythonSDK".to_owned(),
        cause: cause.map(Box::new),
        failure_info: Some(FailureInfo::ApplicationFailureInfo(
            ApplicationFailureInfo {
                r#type: "ApplicationError".to_owned(),
                details: Some(Payloads {
                    payloads: vec![Payload {
                        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
                        data: b"\"details\"".to_vec(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn chain() -> Failure {
    failure(
        "boom MARKER-outer \u{e9}",
        "  File \"a.py\", line 1\nMARKER-stack",
        Some(failure("MARKER-cause", "", None)),
    )
}

fn failed_request(namespace: &str, f: Failure) -> Vec<u8> {
    RespondActivityTaskFailedRequest {
        task_token: b"token".to_vec(),
        namespace: namespace.to_owned(),
        failure: Some(f),
        identity: "worker-1".to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Decrypts a sealed failure's attributes with `codec`: the `json/plain` data.
fn attributes(codec: &PayloadCodec, f: &Failure) -> Vec<u8> {
    let sealed = f.encoded_attributes.as_ref().expect("encoded_attributes");
    assert_eq!(sealed.metadata["encoding"], b"binary/encrypted");
    let plain = codec
        .decode(&sealed.encode_to_vec())
        .unwrap()
        .expect("decrypts");
    let p = Payload::decode(plain).unwrap();
    assert_eq!(p.metadata["encoding"], b"json/plain");
    p.data
}

#[tokio::test]
async fn failures_are_sealed_at_every_level_and_restored_on_the_way_back() {
    let codec = codec("PGW_SEAL_KEY_A", "");
    assert!(codec.seals_failures(Some("default")));
    let layer = layer(codec.clone());
    let upstream = RecordingUpstream::default();
    let response = call(
        &layer,
        &upstream,
        FAILED,
        frame(&failed_request("default", chain())),
        &[],
    )
    .await;
    assert_eq!(response.headers().get("grpc-status"), None, "refused");

    let sent = unframe(&upstream.received.lock().unwrap()[0]);
    assert!(
        !contains(&sent, b"MARKER"),
        "plaintext reached the upstream"
    );
    let got = RespondActivityTaskFailedRequest::decode(&sent[..]).unwrap();
    assert_eq!(got.identity, "worker-1");
    assert_eq!(got.task_token, b"token");
    let outer = got.failure.clone().unwrap();
    assert_eq!(outer.message, "Encoded failure");
    assert_eq!(outer.stack_trace, "");
    assert_eq!(outer.source, "PythonSDK");
    // Exactly what Python's json.dumps(sort_keys=True, separators=(",", ":")) writes.
    assert_eq!(
        attributes(&codec, &outer),
        br#"{"message":"boom MARKER-outer \u00e9","stack_trace":"  File \"a.py\", line 1\nMARKER-stack"}"#
    );
    let cause = outer.cause.as_deref().unwrap();
    assert_eq!(cause.message, "Encoded failure");
    assert_eq!(
        attributes(&codec, cause),
        br#"{"message":"MARKER-cause","stack_trace":""}"#
    );
    // The details payloads are encrypted as always.
    let Some(FailureInfo::ApplicationFailureInfo(info)) = &cause.failure_info else {
        panic!("failure info lost")
    };
    assert_eq!(
        info.details.as_ref().unwrap().payloads[0].metadata["encoding"],
        b"binary/encrypted"
    );

    // The server stores the sealed failure; reading the history through the gateway gives
    // the original messages back.
    let history = GetWorkflowExecutionHistoryResponse {
        history: Some(History {
            events: vec![HistoryEvent {
                event_id: 7,
                attributes: Some(Attributes::WorkflowExecutionFailedEventAttributes(
                    WorkflowExecutionFailedEventAttributes {
                        failure: Some(outer),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    upstream.answer(history.encode_to_vec(), HeaderMap::new());
    let request = GetWorkflowExecutionHistoryRequest {
        namespace: "default".to_owned(),
        ..Default::default()
    };
    let response = call(
        &layer,
        &upstream,
        HISTORY,
        frame(&request.encode_to_vec()),
        &[],
    )
    .await;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let back = GetWorkflowExecutionHistoryResponse::decode(&unframe(&body)[..]).unwrap();
    let Some(Attributes::WorkflowExecutionFailedEventAttributes(a)) =
        &back.history.unwrap().events[0].attributes
    else {
        panic!("event lost")
    };
    let restored = a.failure.as_ref().unwrap();
    let original = chain();
    assert_eq!(restored.message, original.message);
    assert_eq!(restored.stack_trace, original.stack_trace);
    assert_eq!(restored.encoded_attributes, None);
    let rc = restored.cause.as_deref().unwrap();
    assert_eq!(rc.message, "MARKER-cause");
    assert_eq!(rc.encoded_attributes, None);
    assert_eq!(
        rc.failure_info,
        original.cause.as_deref().unwrap().failure_info
    );
}

#[tokio::test]
async fn already_sealed_failures_pass_and_contradicting_ones_are_refused() {
    let codec = codec("PGW_SEAL_KEY_B", "");
    let layer = layer(codec);
    let upstream = RecordingUpstream::default();
    // Sealed by an SDK (attributes not encrypted here: the gateway encrypts them as a payload).
    let mut sdk_sealed = failure("Encoded failure", "", None);
    sdk_sealed.encoded_attributes = Some(Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: br#"{"message":"MARKER-sdk","stack_trace":""}"#.to_vec(),
        ..Default::default()
    });
    let response = call(
        &layer,
        &upstream,
        FAILED,
        frame(&failed_request("default", sdk_sealed.clone())),
        &[],
    )
    .await;
    assert_eq!(response.headers().get("grpc-status"), None);
    let sent = unframe(&upstream.received.lock().unwrap()[0]);
    assert!(!contains(&sent, b"MARKER"), "attributes not encrypted");
    let got = RespondActivityTaskFailedRequest::decode(&sent[..]).unwrap();
    assert_eq!(got.failure.unwrap().message, "Encoded failure");

    // Attributes and a plaintext message the gateway cannot seal: refused, nothing sent.
    let mut both = sdk_sealed;
    both.cause = Some(Box::new({
        let mut c = failure("MARKER-plain", "", None);
        c.encoded_attributes = Some(Payload::default());
        c
    }));
    let response = call(
        &layer,
        &upstream,
        FAILED,
        frame(&failed_request("default", both)),
        &[],
    )
    .await;
    assert_eq!(response.headers()["grpc-status"], "3");
    let message = response.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("failure.cause.message"), "{message}");
    assert!(!message.contains("MARKER"), "{message}");
    assert_eq!(upstream.received.lock().unwrap().len(), 1, "forwarded");
}

#[tokio::test]
async fn the_namespace_switch_turns_sealing_off() {
    let codec = codec(
        "PGW_SEAL_KEY_C",
        "[namespaces.open]\nseal_failures = false\n[namespaces.plain]\nencryption = false\n",
    );
    assert!(!codec.seals_failures(Some("open")));
    assert!(!codec.seals_failures(Some("plain")));
    assert!(codec.seals_failures(Some("other")));
    assert!(codec.seals_failures(None));
    let layer = layer(codec);
    let upstream = RecordingUpstream::default();
    let response = call(
        &layer,
        &upstream,
        FAILED,
        frame(&failed_request("open", chain())),
        &[],
    )
    .await;
    assert_eq!(response.headers().get("grpc-status"), None);
    let sent = unframe(&upstream.received.lock().unwrap()[0]);
    let got = RespondActivityTaskFailedRequest::decode(&sent[..]).unwrap();
    assert_eq!(got.failure.unwrap(), {
        // Only the details payloads changed (encrypted).
        let mut f = chain();
        let sent_failure = RespondActivityTaskFailedRequest::decode(&sent[..])
            .unwrap()
            .failure
            .unwrap();
        f.failure_info = sent_failure.failure_info.clone();
        f.cause.as_mut().unwrap().failure_info =
            sent_failure.cause.as_ref().unwrap().failure_info.clone();
        f
    });
    assert!(contains(&sent, b"boom MARKER-outer"));
}
