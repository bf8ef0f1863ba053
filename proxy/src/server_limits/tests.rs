use prost::Message as _;
use temporalio_protos::temporal::api::namespace::v1::{
    NamespaceConfig, NamespaceInfo, namespace_info,
};
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeNamespaceResponse, ListNamespacesResponse,
};

use super::*;

fn describe(name: &str, limits: Option<(i64, i64, i64)>) -> DescribeNamespaceResponse {
    DescribeNamespaceResponse {
        namespace_info: Some(NamespaceInfo {
            name: name.into(),
            id: format!("id-{name}"),
            description: "kept".into(),
            limits: limits.map(|(b, m, c)| namespace_info::Limits {
                blob_size_limit_error: b,
                memo_size_limit_error: m,
                workflow_task_completion_size_limit_error: c,
            }),
            ..Default::default()
        }),
        config: Some(NamespaceConfig {
            history_archival_uri: "kept-too".into(),
            ..Default::default()
        }),
        failover_version: 7,
        ..Default::default()
    }
}

const PROMISE: Promise = Promise {
    blob: 50_000_000,
    memo: 50_000_000,
    completion: 200_000_000,
};

fn only_a(name: &str) -> Option<Promise> {
    (name == "a").then_some(PROMISE)
}

#[test]
fn describe_answers_of_offloading_namespaces_advertise_the_promise() {
    let original = describe("a", Some((2 << 20, 2 << 20, 0)));
    let bytes = original.encode_to_vec();
    let edited = advertise(NamespaceAnswer::Describe, &bytes, only_a)
        .unwrap()
        .expect("rewritten");
    let decoded = DescribeNamespaceResponse::decode(edited.as_slice()).unwrap();
    let limits = decoded.namespace_info.as_ref().unwrap().limits.unwrap();
    assert_eq!(limits.blob_size_limit_error, 50_000_000);
    assert_eq!(limits.memo_size_limit_error, 50_000_000);
    assert_eq!(
        limits.workflow_task_completion_size_limit_error,
        200_000_000
    );
    // Everything else is as the server sent it.
    let mut expected = original.clone();
    expected.namespace_info.as_mut().unwrap().limits =
        decoded.namespace_info.as_ref().unwrap().limits;
    assert_eq!(decoded, expected);
    // The server's figures are read from the original.
    assert_eq!(
        stated_in(NamespaceAnswer::Describe, &bytes).unwrap(),
        vec![(
            "a".to_owned(),
            Stated {
                blob: Some(2 << 20),
                memo: Some(2 << 20),
                completion: None
            }
        )]
    );
}

#[test]
fn namespaces_without_a_promise_keep_the_servers_figures() {
    let bytes = describe("b", Some((2 << 20, 2 << 20, 0))).encode_to_vec();
    assert!(
        advertise(NamespaceAnswer::Describe, &bytes, only_a)
            .unwrap()
            .is_none()
    );
    // No limits at all: the promise is added.
    let bytes = describe("a", None).encode_to_vec();
    let edited = advertise(NamespaceAnswer::Describe, &bytes, only_a)
        .unwrap()
        .unwrap();
    let decoded = DescribeNamespaceResponse::decode(edited.as_slice()).unwrap();
    assert_eq!(
        decoded
            .namespace_info
            .unwrap()
            .limits
            .unwrap()
            .blob_size_limit_error,
        50_000_000
    );
}

#[test]
fn list_answers_are_rewritten_per_namespace() {
    let list = ListNamespacesResponse {
        namespaces: vec![
            describe("a", Some((1, 2, 3))),
            describe("b", Some((4, 5, 6))),
        ],
        next_page_token: b"page".to_vec(),
    };
    let bytes = list.encode_to_vec();
    let edited = advertise(NamespaceAnswer::List, &bytes, only_a)
        .unwrap()
        .unwrap();
    let decoded = ListNamespacesResponse::decode(edited.as_slice()).unwrap();
    let limits: Vec<_> = decoded
        .namespaces
        .iter()
        .map(|d| {
            d.namespace_info
                .as_ref()
                .unwrap()
                .limits
                .unwrap()
                .blob_size_limit_error
        })
        .collect();
    assert_eq!(limits, vec![50_000_000, 4]);
    assert_eq!(decoded.next_page_token, b"page");
}

#[test]
fn merged_parts_and_duplicate_limits_still_decode_to_the_promise() {
    // namespace_info split in two parts, each with limits, and limits duplicated in one:
    // a parser merges them; after the rewrite every merge gives the promise.
    let first = describe("a", Some((1, 1, 1))).encode_to_vec();
    let mut second = Vec::new();
    let info = NamespaceInfo {
        limits: Some(namespace_info::Limits {
            blob_size_limit_error: 9,
            memo_size_limit_error: 9,
            workflow_task_completion_size_limit_error: 9,
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let mut doubled = info.clone();
    doubled.extend_from_slice(&info);
    put_len_field(&mut second, 1, &doubled);
    let mut bytes = first;
    bytes.extend_from_slice(&second);
    let stated = stated_in(NamespaceAnswer::Describe, &bytes).unwrap();
    assert_eq!(stated[0].1.blob, Some(9), "last occurrence wins");
    let edited = advertise(NamespaceAnswer::Describe, &bytes, only_a)
        .unwrap()
        .unwrap();
    let decoded = DescribeNamespaceResponse::decode(edited.as_slice()).unwrap();
    let info = decoded.namespace_info.unwrap();
    assert_eq!(info.name, "a");
    assert_eq!(info.limits.unwrap().blob_size_limit_error, 50_000_000);
    assert_eq!(
        info.limits
            .unwrap()
            .workflow_task_completion_size_limit_error,
        200_000_000
    );
}

#[test]
fn unstated_and_negative_limits_are_not_limits() {
    let bytes = describe("a", Some((0, -5, 0))).encode_to_vec();
    assert_eq!(
        stated_in(NamespaceAnswer::Describe, &bytes).unwrap()[0].1,
        Stated::default()
    );
}

#[test]
fn malformed_answers_are_errors() {
    assert!(advertise(NamespaceAnswer::Describe, &[0x0a, 0x05, 0x01], only_a).is_err());
    assert!(stated_in(NamespaceAnswer::List, &[0xff]).is_err());
}

#[test]
fn the_promise_leaves_room_for_the_codec_and_the_message() {
    let p = Promise::new(50 * 1024 * 1024, 256 * 1024 * 1024);
    assert!(p.blob < 50 * 1024 * 1024 - 50 * 1024 * 1024 / 256);
    assert_eq!(p.memo, p.blob);
    assert_eq!(p.completion, 256 * 1024 * 1024 - 64 * 1024);
    // A gateway message limit below the driver's: the message limit bounds the payload.
    let p = Promise::new(50 * 1024 * 1024, 8 * 1024 * 1024);
    assert_eq!(p.blob, 8 * 1024 * 1024 - 64 * 1024);
}

#[test]
fn methods_map_to_answers() {
    assert_eq!(
        NamespaceAnswer::of_method(
            "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace"
        ),
        Some(NamespaceAnswer::Describe)
    );
    assert_eq!(
        NamespaceAnswer::of_method(
            "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces"
        ),
        Some(NamespaceAnswer::List)
    );
    assert_eq!(
        NamespaceAnswer::of_method(
            "/temporal.api.operatorservice.v1.OperatorService/ListNamespaces"
        ),
        None
    );
}
