//! Protected search attributes (issue 26): what the gateway adds to one list call, in process.
//! The end-to-end figure (the same list call through gateways with and without protection, one
//! run) is `benches/search-attributes.py`. Results: BENCHMARKS.md, "Protected search attributes".
//!
//! `cargo bench -p payload-gateway-benches --bench search_attributes`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use payload_gateway::codec::PayloadCodec;
use payload_gateway::config::{Config, KeySpec};
use payload_gateway::search_attributes::SearchAttributeGuard;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{Payload, SearchAttributes};
use temporalio_protos::temporal::api::workflow::v1::WorkflowExecutionInfo;
use temporalio_protos::temporal::api::workflowservice::v1::{
    ListWorkflowExecutionsRequest, ListWorkflowExecutionsResponse, StartWorkflowExecutionRequest,
};

const LIST: &str = "/temporal.api.workflowservice.v1.WorkflowService/ListWorkflowExecutions";
const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";

fn guard(dir: &std::path::Path, keys: &[&str]) -> SearchAttributeGuard {
    let mut config = Config::default();
    config.encryption.enabled = true;
    config.encryption.keys = keys
        .iter()
        .map(|id| {
            let file = dir.join(format!("{id}.key"));
            std::fs::write(&file, [id.len() as u8; 32]).unwrap();
            KeySpec {
                id: (*id).into(),
                file: Some(file),
                env: None,
                kms: None,
            }
        })
        .collect();
    config.encryption.active_key = Some(keys[0].into());
    config.search_attributes.protect = vec!["CustomerEmail".into()];
    let codec = Arc::new(PayloadCodec::from_config(&config).unwrap());
    SearchAttributeGuard::from_config(&config, codec).unwrap()
}

fn list(query: &str) -> Bytes {
    Bytes::from(
        ListWorkflowExecutionsRequest {
            namespace: "default".into(),
            query: query.into(),
            page_size: 100,
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn email(value: &str) -> SearchAttributes {
    SearchAttributes {
        indexed_fields: HashMap::from([(
            "CustomerEmail".to_owned(),
            Payload {
                metadata: HashMap::from([
                    ("encoding".to_owned(), b"json/plain".to_vec()),
                    ("type".to_owned(), b"Keyword".to_vec()),
                ]),
                data: format!("{value:?}").into_bytes(),
                ..Default::default()
            },
        )]),
    }
}

/// A list response of 10 executions whose `CustomerEmail` is what `guard` wrote for `value`.
fn response(guard: &SearchAttributeGuard, value: &str) -> Bytes {
    let start = payload_gateway_proto::method(START).unwrap();
    let written = guard
        .on_request(
            &start,
            Some("default"),
            vec![Bytes::from(
                StartWorkflowExecutionRequest {
                    namespace: "default".into(),
                    search_attributes: Some(email(value)),
                    ..Default::default()
                }
                .encode_to_vec(),
            )],
        )
        .unwrap();
    let sa = StartWorkflowExecutionRequest::decode(&written[0][..])
        .unwrap()
        .search_attributes;
    Bytes::from(
        ListWorkflowExecutionsResponse {
            executions: (0..10)
                .map(|_| WorkflowExecutionInfo {
                    search_attributes: sa.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let m = payload_gateway_proto::method(LIST).unwrap();
    let mut g = c.benchmark_group("search_attributes");
    g.measurement_time(Duration::from_secs(3));
    for keys in [&["k1"][..], &["k1", "k0"][..]] {
        let guard = guard(dir.path(), keys);
        let n = keys.len();
        let protected = list(r#"CustomerEmail = "alice@example.com" AND WorkflowType = 'Order'"#);
        let plain = list("WorkflowType = 'Order' AND ExecutionStatus = 'Running'");
        g.bench_function(format!("request: query rewritten ({n} key)"), |b| {
            b.iter(|| guard.on_request(&m, Some("default"), vec![black_box(protected.clone())]))
        });
        g.bench_function(
            format!("request: query parsed, nothing protected ({n} key)"),
            |b| b.iter(|| guard.on_request(&m, Some("default"), vec![black_box(plain.clone())])),
        );
        let tokens = response(&guard, "alice@example.com");
        g.bench_function(format!("response: 10 tokens opened ({n} key)"), |b| {
            b.iter(|| {
                guard.on_response(m.response, Some("default"), vec![black_box(tokens.clone())])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
