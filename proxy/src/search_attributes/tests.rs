//! The guard over real Temporal messages (`temporalio-protos`) and a real codec keyring.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{Payload as PbPayload, SearchAttributes};
use temporalio_protos::temporal::api::workflow::v1::WorkflowExecutionInfo;
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeWorkflowExecutionResponse, ListWorkflowExecutionsRequest, StartWorkflowExecutionRequest,
};

use super::*;
use crate::config::KeySpec;

const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";
const LIST: &str = "/temporal.api.workflowservice.v1.WorkflowService/ListWorkflowExecutions";
const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeWorkflowExecution";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn key(&self, id: &str, byte: u8) -> KeySpec {
        let path: PathBuf = self.dir.path().join(format!("{id}.key"));
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([byte; 32]),
        )
        .unwrap();
        KeySpec {
            id: id.into(),
            file: Some(path),
            env: None,
            kms: None,
        }
    }

    /// k1 and k2 in the keyring, `active` encrypting, `CustomerEmail` and `Tags` protected.
    fn config(&self, active: &str) -> Config {
        let mut c = Config::default();
        c.encryption.dev_key_file = self.dir.path().join("dev.key");
        c.encryption.keys = vec![self.key("k1", 1), self.key("k2", 2)];
        c.encryption.active_key = Some(active.into());
        c.search_attributes.protect = vec!["CustomerEmail".into(), "Tags".into()];
        c
    }

    fn guard(&self, config: &Config) -> (SearchAttributeGuard, Arc<PayloadCodec>) {
        let codec = Arc::new(PayloadCodec::from_config(config).unwrap());
        (
            SearchAttributeGuard::from_config(config, codec.clone()).unwrap(),
            codec,
        )
    }
}

fn method(path: &str) -> Method {
    payload_gateway_proto::method(path).unwrap()
}

fn json_payload(value: &str, ty: &str) -> PbPayload {
    PbPayload {
        metadata: HashMap::from([
            ("encoding".to_owned(), b"json/plain".to_vec()),
            ("type".to_owned(), ty.as_bytes().to_vec()),
        ]),
        data: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn attributes() -> SearchAttributes {
    SearchAttributes {
        indexed_fields: HashMap::from([
            (
                "CustomerEmail".to_owned(),
                json_payload(r#""alice@example.com""#, "Keyword"),
            ),
            (
                "Tags".to_owned(),
                json_payload(r#"["gold","eu"]"#, "KeywordList"),
            ),
            ("Region".to_owned(), json_payload(r#""eu-west""#, "Keyword")),
        ]),
    }
}

fn start_request() -> Bytes {
    Bytes::from(
        StartWorkflowExecutionRequest {
            namespace: "default".into(),
            workflow_id: "wf".into(),
            search_attributes: Some(attributes()),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn data(sa: &SearchAttributes, name: &str) -> String {
    String::from_utf8(sa.indexed_fields[name].data.clone()).unwrap()
}

#[test]
fn writes_carry_tokens_and_reads_restore_the_originals() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let out = guard
        .on_request(&method(START), Some("default"), vec![start_request()])
        .unwrap();
    let sent = StartWorkflowExecutionRequest::decode(&out[0][..]).unwrap();
    let sa = sent.search_attributes.unwrap();
    let email = data(&sa, "CustomerEmail");
    assert!(email.starts_with("\"pgw1:k1:"), "{email}");
    assert!(!email.contains("alice"));
    let tags: Vec<String> = serde_json::from_str(&data(&sa, "Tags")).unwrap();
    assert_eq!(tags.len(), 2);
    assert!(tags.iter().all(|t| t.starts_with("pgw1:k1:")));
    assert_eq!(
        data(&sa, "Region"),
        r#""eu-west""#,
        "unprotected values stay"
    );
    assert_eq!(
        sa.indexed_fields["CustomerEmail"].metadata["type"],
        b"Keyword".to_vec()
    );
    assert_eq!(sent.workflow_id, "wf");

    // The server answers describe with what it stored; the gateway restores it.
    let described = DescribeWorkflowExecutionResponse {
        workflow_execution_info: Some(WorkflowExecutionInfo {
            search_attributes: Some(sa.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let back = guard
        .on_response(
            method(DESCRIBE).response,
            Some("default"),
            vec![Bytes::from(described)],
        )
        .unwrap();
    let back = DescribeWorkflowExecutionResponse::decode(&back[0][..]).unwrap();
    let restored = back
        .workflow_execution_info
        .unwrap()
        .search_attributes
        .unwrap();
    assert_eq!(restored, attributes());
}

#[test]
fn requests_without_protected_attributes_pass_byte_for_byte() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let plain = Bytes::from(
        StartWorkflowExecutionRequest {
            namespace: "default".into(),
            search_attributes: Some(SearchAttributes {
                indexed_fields: HashMap::from([(
                    "Region".to_owned(),
                    json_payload(r#""x""#, "Keyword"),
                )]),
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let out = guard
        .on_request(&method(START), Some("default"), vec![plain.clone()])
        .unwrap();
    assert_eq!(out[0], plain);
}

#[test]
fn a_namespace_list_replaces_the_top_level_one() {
    let f = Fixture::new();
    let mut config = f.config("k1");
    config.namespaces.insert(
        "open".into(),
        crate::config::NamespaceConfig {
            search_attributes: Some(crate::config::SearchAttributesConfig { protect: vec![] }),
            ..Default::default()
        },
    );
    let (guard, _) = f.guard(&config);
    assert!(guard.protected(Some("open")).is_empty());
    let request = start_request();
    let out = guard
        .on_request(&method(START), Some("open"), vec![request.clone()])
        .unwrap();
    assert_eq!(out[0], request);
}

fn list(query: &str) -> Bytes {
    Bytes::from(
        ListWorkflowExecutionsRequest {
            namespace: "default".into(),
            query: query.into(),
            page_size: 7,
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn sent_query(guard: &SearchAttributeGuard, query: &str) -> Result<String, Status> {
    let out = guard.on_request(&method(LIST), Some("default"), vec![list(query)])?;
    let sent = ListWorkflowExecutionsRequest::decode(&out[0][..]).unwrap();
    assert_eq!(sent.page_size, 7);
    Ok(sent.query)
}

#[test]
fn queries_get_the_tokens_of_every_key_in_use() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let written = guard
        .on_request(&method(START), Some("default"), vec![start_request()])
        .unwrap();
    let sa = StartWorkflowExecutionRequest::decode(&written[0][..])
        .unwrap()
        .search_attributes
        .unwrap();
    let token: String = serde_json::from_str(&data(&sa, "CustomerEmail")).unwrap();

    let q = sent_query(
        &guard,
        r#"CustomerEmail = "alice@example.com" AND Region = 'eu'"#,
    )
    .unwrap();
    assert!(q.starts_with("CustomerEmail IN ('pgw1:k1:"), "{q}");
    assert!(q.contains(&format!("'{token}'")), "{q}");
    assert!(q.contains("'pgw1:k2:"), "the other key's token too: {q}");
    assert!(q.ends_with(" AND Region = 'eu'"));
    assert!(!q.contains("alice"));
    // Unprotected queries are not touched.
    assert_eq!(
        sent_query(&guard, "Region = 'eu'").unwrap(),
        "Region = 'eu'"
    );
}

#[test]
fn refused_queries_name_the_attribute() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let err = sent_query(&guard, "CustomerEmail STARTS_WITH 'al'").unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(err.message.contains("CustomerEmail"), "{}", err.message);
    assert!(err.message.contains("STARTS_WITH"));
    let err = sent_query(&guard, "CustomerEmail = 'a' AND (").unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    // A query that does not parse is refused even without a protected name in it.
    assert!(sent_query(&guard, "Region = ").is_err());
}

#[test]
fn non_string_values_are_refused() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let bad = StartWorkflowExecutionRequest {
        namespace: "default".into(),
        search_attributes: Some(SearchAttributes {
            indexed_fields: HashMap::from([(
                "CustomerEmail".to_owned(),
                json_payload("42", "Int"),
            )]),
        }),
        ..Default::default()
    };
    let err = guard
        .on_request(
            &method(START),
            Some("default"),
            vec![Bytes::from(bad.encode_to_vec())],
        )
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(err.message.contains("CustomerEmail"));
}

#[test]
fn tokens_of_a_key_the_namespace_cannot_use_fail_closed() {
    let f = Fixture::new();
    let (guard, _) = f.guard(&f.config("k1"));
    let written = guard
        .on_request(&method(START), Some("default"), vec![start_request()])
        .unwrap();
    let sa = StartWorkflowExecutionRequest::decode(&written[0][..])
        .unwrap()
        .search_attributes
        .unwrap();
    // Another gateway whose keyring has only k2 reads it back.
    let mut other = f.config("k2");
    other.encryption.keys.retain(|k| k.id == "k2");
    let (reader, _) = f.guard(&other);
    let described = DescribeWorkflowExecutionResponse {
        workflow_execution_info: Some(WorkflowExecutionInfo {
            search_attributes: Some(sa),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = reader
        .on_response(
            method(DESCRIBE).response,
            Some("default"),
            vec![Bytes::from(described.encode_to_vec())],
        )
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(err.message.contains("k1"));
}

#[test]
fn without_encryption_there_is_no_key_to_protect_with() {
    let f = Fixture::new();
    let mut config = f.config("k1");
    config.encryption.enabled = false;
    let (guard, codec) = f.guard(&config);
    assert!(
        codec
            .search_attribute_roots(Some("default"))
            .active
            .is_none()
    );
    let err = guard
        .on_request(&method(START), Some("default"), vec![start_request()])
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
}

#[test]
fn roots_are_redacted_in_debug_output() {
    let f = Fixture::new();
    let (_, codec) = f.guard(&f.config("k1"));
    let roots = codec.search_attribute_roots(Some("default"));
    let shown = format!("{roots:?}");
    assert!(shown.contains("k1") && shown.contains("k2"), "{shown}");
    assert_eq!(roots.active.as_ref().map(|(id, _)| id.as_str()), Some("k1"));
}
