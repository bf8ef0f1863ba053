//! Payload walker benchmarks: `cargo bench -p payload-gateway-benches --bench walker`.
//!
//! Identity rewrite (scan + splice with no replacement), a splice replacing every payload
//! (as the codec does), and prost-reflect `DynamicMessage` decode + encode of the same
//! bytes for comparison. Throughput is in bytes of the input message.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway_proto::{MessageType, scan};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use temporalio_protos::protos::temporal::api::{
    common::v1::{Header, Payload, Payloads},
    history::v1::{self as history, history_event::Attributes},
    workflowservice::v1 as ws,
};

fn payload(i: usize, size: usize) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: (0..size).map(|j| b'a' + ((i + j) % 26) as u8).collect(),
        ..Default::default()
    }
}

fn payloads(i: usize, size: usize) -> Option<Payloads> {
    Some(Payloads {
        payloads: vec![payload(i, size)],
    })
}

/// A ~4 MB poll response whose history holds 1,000 payloads of ~4 KB, among
/// payload-free workflow-task events.
fn big_poll_response() -> Vec<u8> {
    let mut events = Vec::new();
    let ev = |id: i64, attrs: Attributes| history::HistoryEvent {
        event_id: id,
        event_time: Some(Default::default()),
        attributes: Some(attrs),
        ..Default::default()
    };
    for i in 0..1000 {
        let id = 3 * i as i64;
        let size = 4000;
        let attrs = match i % 3 {
            0 => Attributes::ActivityTaskScheduledEventAttributes(
                history::ActivityTaskScheduledEventAttributes {
                    activity_id: format!("act-{i}"),
                    input: payloads(i, size),
                    header: Some(Header::default()),
                    ..Default::default()
                },
            ),
            1 => Attributes::ActivityTaskCompletedEventAttributes(
                history::ActivityTaskCompletedEventAttributes {
                    result: payloads(i, size),
                    scheduled_event_id: id - 2,
                    identity: "worker-1".into(),
                    ..Default::default()
                },
            ),
            _ => Attributes::WorkflowExecutionSignaledEventAttributes(
                history::WorkflowExecutionSignaledEventAttributes {
                    signal_name: "sig".into(),
                    input: payloads(i, size),
                    ..Default::default()
                },
            ),
        };
        events.push(ev(id + 1, attrs));
        events.push(ev(
            id + 2,
            Attributes::WorkflowTaskScheduledEventAttributes(
                history::WorkflowTaskScheduledEventAttributes {
                    start_to_close_timeout: Some(Default::default()),
                    attempt: 1,
                    ..Default::default()
                },
            ),
        ));
        events.push(ev(
            id + 3,
            Attributes::WorkflowTaskCompletedEventAttributes(
                history::WorkflowTaskCompletedEventAttributes {
                    scheduled_event_id: id + 2,
                    identity: "worker-1".into(),
                    ..Default::default()
                },
            ),
        ));
    }
    ws::PollWorkflowTaskQueueResponse {
        task_token: vec![7; 64],
        workflow_execution: Some(Default::default()),
        history: Some(history::History { events }),
        attempt: 1,
        ..Default::default()
    }
    .encode_to_vec()
}

/// A ~1 KB activity completion.
fn small_completion() -> Vec<u8> {
    ws::RespondActivityTaskCompletedRequest {
        task_token: vec![9; 120],
        result: payloads(1, 800),
        identity: "worker-1@host".into(),
        namespace: "default".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn bench_message(c: &mut Criterion, label: &str, name: &str, bytes: Vec<u8>) {
    let pool = DescriptorPool::decode(
        std::fs::read(payload_gateway_proto::DESCRIPTOR_SET_PATH)
            .expect("descriptor set")
            .as_slice(),
    )
    .unwrap();
    let desc = pool.get_message_by_name(name).unwrap();
    let ty = MessageType::by_name(name).unwrap();
    let input = Bytes::from(bytes);
    let sites = scan(ty, &input).unwrap().sites().len();
    // What a codec returns: every payload a bit longer (nonce + tag + header).
    let scanned = scan(ty, &input).unwrap();
    let replacements: Vec<Option<Bytes>> = scanned
        .sites()
        .iter()
        .map(|s| {
            let mut p = Payload::decode(&input[s.range()]).unwrap();
            p.data.extend_from_slice(&[0x5a; 28]);
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let nones = vec![None; sites];

    let mut g = c.benchmark_group(format!("walker/{label}"));
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    g.sample_size(30);
    g.bench_function("scan_only", |b| {
        b.iter(|| scan(ty, black_box(&input)).unwrap())
    });
    g.bench_function("identity_scan_splice", |b| {
        b.iter(|| {
            let s = scan(ty, black_box(&input)).unwrap();
            s.splice(&input, &nones).unwrap()
        })
    });
    g.bench_function("replace_all_scan_splice", |b| {
        b.iter(|| {
            let s = scan(ty, black_box(&input)).unwrap();
            s.splice(&input, black_box(&replacements)).unwrap()
        })
    });
    g.bench_function("prost_reflect_decode_encode", |b| {
        b.iter(|| {
            let m = DynamicMessage::decode(desc.clone(), black_box(&input[..])).unwrap();
            m.encode_to_vec()
        })
    });
    g.finish();
    eprintln!("{label}: {} bytes, {sites} payload sites", input.len());
}

fn walker(c: &mut Criterion) {
    bench_message(
        c,
        "poll_response_4mb",
        "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
        big_poll_response(),
    );
    bench_message(
        c,
        "activity_completed_1kb",
        "temporal.api.workflowservice.v1.RespondActivityTaskCompletedRequest",
        small_completion(),
    );
}

criterion_group!(benches, walker);
criterion_main!(benches);
