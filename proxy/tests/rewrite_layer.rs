//! The rewrite layer in process, with a real codec, in front of an upstream that records what it
//! receives and answers with a chosen response.

use std::collections::HashMap;
use std::io::Write;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use payload_gateway::codec::PayloadCodec;
use payload_gateway::grpc::GatewayBody;
use payload_gateway::rewrite::RewriteLayer;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{
    Payload, Payloads, SearchAttributes, WorkflowType,
};
use temporalio_protos::temporal::api::workflowservice::v1::{
    StartWorkflowExecutionRequest, StartWorkflowExecutionResponse,
};
mod common;
use common::upstream::{RecordingUpstream, call, codec, contains, frame, layer, unframe};

const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";

fn payload(data: &[u8]) -> Payload {
    Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: data.to_vec(),
        ..Default::default()
    }
}

fn start_request(secret: &[u8]) -> Vec<u8> {
    let request = StartWorkflowExecutionRequest {
        namespace: "default".to_owned(),
        workflow_id: "wf-1".to_owned(),
        workflow_type: Some(WorkflowType {
            name: "Greeting".to_owned(),
        }),
        input: Some(Payloads {
            payloads: vec![payload(secret), payload(b"\"second\"")],
        }),
        search_attributes: Some(SearchAttributes {
            indexed_fields: HashMap::from([(
                "CustomKeywordField".to_owned(),
                payload(b"\"visible-sa\""),
            )]),
        }),
        ..Default::default()
    };
    let mut bytes = request.encode_to_vec();
    // An unknown field (number 999, length-delimited) from a newer SDK must survive.
    bytes.extend_from_slice(&[0xba, 0x3e, 0x03, b'n', b'e', b'w']);
    bytes
}

#[tokio::test]
async fn request_payloads_are_encrypted_and_everything_else_kept() {
    let layer = layer(codec("PGW_TEST_KEY_A", ""));
    let upstream = RecordingUpstream::default();
    let secret = b"\"top secret input that must never reach the server\"";
    let original = start_request(secret);
    let response = call(&layer, &upstream, START, frame(&original), &[]).await;
    assert_eq!(
        response.headers().get("grpc-status"),
        None,
        "forwarded, not refused"
    );

    let sent = unframe(&upstream.received.lock().unwrap()[0]);
    assert!(
        !contains(&sent, b"top secret"),
        "plaintext reached the upstream"
    );
    assert!(!contains(&sent, b"second"), "second payload not encrypted");
    assert!(
        contains(&sent, b"visible-sa"),
        "search attributes must stay plaintext"
    );
    assert!(
        sent.ends_with(&[0xba, 0x3e, 0x03, b'n', b'e', b'w']),
        "unknown field lost"
    );
    let decoded = StartWorkflowExecutionRequest::decode(&sent[..]).unwrap();
    assert_eq!(decoded.workflow_id, "wf-1");
    for p in decoded.input.unwrap().payloads {
        assert_eq!(p.metadata["encoding"], b"binary/encrypted");
        assert_eq!(p.metadata["encryption-key-id"], b"k1");
    }
}

/// Encrypts every payload of `message` (of `ty`) the way the gateway would.
fn encode_all(codec: &PayloadCodec, ty: &str, message: &[u8]) -> Vec<u8> {
    let ty = payload_gateway_proto::MessageType::by_name(ty).unwrap();
    let message = Bytes::copy_from_slice(message);
    let scan = payload_gateway_proto::scan(ty, &message).unwrap();
    let encoded: Vec<Option<Bytes>> = scan
        .sites()
        .iter()
        .map(|s| codec.encode(Some("default"), &message[s.range()]).unwrap())
        .collect();
    assert!(encoded.iter().all(Option::is_some));
    scan.splice(&message, &encoded).unwrap().to_vec()
}

const QUERY: &str = "/temporal.api.workflowservice.v1.WorkflowService/QueryWorkflow";

async fn query(layer: &RewriteLayer, upstream: &RecordingUpstream) -> Response<GatewayBody> {
    let request = temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowRequest {
        namespace: "default".to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    call(layer, upstream, QUERY, frame(&request), &[]).await
}

#[tokio::test]
async fn responses_come_back_byte_identical_after_a_round_trip() {
    let codec = codec("PGW_TEST_KEY_B", "");
    let layer = layer(codec.clone());
    let upstream = RecordingUpstream::default();
    let mut original =
        temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowResponse {
            query_result: Some(Payloads {
                payloads: vec![payload(b"\"query result\""), payload(&[b'z'; 4096])],
            }),
            ..Default::default()
        }
        .encode_to_vec();
    original.extend_from_slice(&[0xba, 0x3e, 0x01, b'u']);
    let stored = encode_all(
        &codec,
        "temporal.api.workflowservice.v1.QueryWorkflowResponse",
        &original,
    );
    assert!(!contains(&stored, b"query result"));
    upstream.answer(stored, HeaderMap::new());
    let collected = query(&layer, &upstream)
        .await
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(unframe(&collected.to_bytes()), original);
}

#[tokio::test]
async fn failure_details_in_status_trailers_are_decoded() {
    use temporalio_protos::google::rpc::Status as RpcStatus;
    use temporalio_protos::temporal::api::errordetails::v1::MultiOperationExecutionFailure;
    use temporalio_protos::temporal::api::errordetails::v1::multi_operation_execution_failure::OperationStatus;
    use temporalio_protos::temporal::api::failure::v1::{
        ApplicationFailureInfo, Failure, failure::FailureInfo,
    };

    let codec = codec("PGW_TEST_KEY_I", "");
    let layer = layer(codec.clone());
    let upstream = RecordingUpstream::default();
    let failure = Failure {
        message: "boom".to_owned(),
        failure_info: Some(FailureInfo::ApplicationFailureInfo(
            ApplicationFailureInfo {
                details: Some(Payloads {
                    payloads: vec![payload(b"\"failure detail\"")],
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let any = |type_name: &str, value: Vec<u8>| prost_wkt_types_any(type_name, value);
    let inner = RpcStatus {
        code: 3,
        message: "op failed".to_owned(),
        details: vec![any(
            "temporal.api.failure.v1.Failure",
            failure.encode_to_vec(),
        )],
    };
    let multi = MultiOperationExecutionFailure {
        statuses: vec![OperationStatus {
            code: 3,
            message: "op failed".to_owned(),
            details: inner.details.clone(),
        }],
    };
    let status = RpcStatus {
        code: 3,
        message: "multi".to_owned(),
        details: vec![any(
            "temporal.api.errordetails.v1.MultiOperationExecutionFailure",
            multi.encode_to_vec(),
        )],
    };
    let plain = status.encode_to_vec();
    let stored = encode_all(&codec, "google.rpc.Status", &plain);
    assert!(!contains(&stored, b"failure detail"));
    use base64::Engine;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "3".parse().unwrap());
    trailers.insert("grpc-message", "multi".parse().unwrap());
    trailers.insert(
        "grpc-status-details-bin",
        base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(&stored)
            .parse()
            .unwrap(),
    );
    upstream.answer(Vec::new(), trailers);
    let collected = query(&layer, &upstream)
        .await
        .into_body()
        .collect()
        .await
        .unwrap();
    let trailers = collected.trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "3");
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trailers["grpc-status-details-bin"].as_bytes())
        .unwrap();
    assert_eq!(details, plain);
}

/// A `google.protobuf.Any` holding `value` of `type_name`.
fn prost_wkt_types_any(type_name: &str, value: Vec<u8>) -> prost_wkt_types::Any {
    prost_wkt_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value,
    }
}

#[tokio::test]
async fn malformed_request_is_invalid_argument_and_nothing_is_forwarded() {
    let layer = layer(codec("PGW_TEST_KEY_C", ""));
    let upstream = RecordingUpstream::default();
    let mut bad = start_request(b"\"x\"");
    bad.truncate(bad.len() - 20);
    let response = call(&layer, &upstream, START, frame(&bad), &[]).await;
    assert_eq!(response.headers()["grpc-status"], "3");
    let message = response.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("StartWorkflowExecution"), "{message}");
    assert!(
        upstream.received.lock().unwrap().is_empty(),
        "a malformed request was forwarded"
    );
}

#[tokio::test]
async fn truncated_frame_is_invalid_argument() {
    let layer = layer(codec("PGW_TEST_KEY_D", ""));
    let upstream = RecordingUpstream::default();
    let mut body = frame(&start_request(b"\"x\"")).to_vec();
    body.truncate(body.len() - 1);
    let response = call(&layer, &upstream, START, Bytes::from(body), &[]).await;
    assert_eq!(response.headers()["grpc-status"], "3");
    assert!(upstream.received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn gzip_frames_are_inflated_and_rewritten() {
    let layer = layer(codec("PGW_TEST_KEY_E", ""));
    let upstream = RecordingUpstream::default();
    let original = start_request(b"\"gzipped secret\"");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&original).unwrap();
    let compressed = gz.finish().unwrap();
    let mut body = vec![1u8];
    body.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    body.extend_from_slice(&compressed);
    let response = call(
        &layer,
        &upstream,
        START,
        Bytes::from(body),
        &[("grpc-encoding", "gzip")],
    )
    .await;
    assert_eq!(response.headers().get("grpc-status"), None);
    let sent = unframe(&upstream.received.lock().unwrap()[0]);
    assert!(!contains(&sent, b"gzipped secret"));
    assert_eq!(
        StartWorkflowExecutionRequest::decode(&sent[..])
            .unwrap()
            .workflow_id,
        "wf-1"
    );
}

#[tokio::test]
async fn oversized_message_is_resource_exhausted() {
    let layer = layer(codec("PGW_TEST_KEY_F", ""));
    let upstream = RecordingUpstream::default();
    let big = start_request(&vec![b'a'; 5 << 20]);
    let response = call(&layer, &upstream, START, frame(&big), &[]).await;
    assert_eq!(response.headers()["grpc-status"], "8");
    assert!(upstream.received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn undecodable_response_names_key_and_path() {
    // The upstream answers with a payload encrypted under a key this gateway doesn't have.
    let layer = layer(codec("PGW_TEST_KEY_G", ""));
    let upstream = RecordingUpstream::default();
    let foreign = Payload {
        metadata: HashMap::from([
            ("encoding".to_owned(), b"binary/encrypted".to_vec()),
            ("encryption-key-id".to_owned(), b"k-unknown".to_vec()),
        ]),
        data: vec![7u8; 64],
        ..Default::default()
    };
    let response_message =
        temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowResponse {
            query_result: Some(Payloads {
                payloads: vec![foreign],
            }),
            ..Default::default()
        }
        .encode_to_vec();
    upstream.answer(response_message, HeaderMap::new());
    let request = temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowRequest {
        namespace: "default".to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let response = call(
        &layer,
        &upstream,
        QUERY,
        frame(&request),
        &[("te", "trailers")],
    )
    .await;
    let status = response.headers()["grpc-status"]
        .to_str()
        .unwrap()
        .to_owned();
    let message = response.headers()["grpc-message"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(status, "13", "{message}");
    assert!(message.contains("k-unknown"), "{message}");
    assert!(message.contains("query_result"), "{message}");
}

#[tokio::test]
async fn start_response_without_payloads_passes_unchanged() {
    let layer = layer(codec("PGW_TEST_KEY_H", ""));
    let upstream = RecordingUpstream::default();
    let answer = StartWorkflowExecutionResponse {
        run_id: "run-1".to_owned(),
        started: true,
        ..Default::default()
    }
    .encode_to_vec();
    upstream.answer(answer.clone(), HeaderMap::new());
    let response = call(
        &layer,
        &upstream,
        START,
        frame(&start_request(b"\"x\"")),
        &[],
    )
    .await;
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(unframe(&collected.to_bytes()), answer);
}
