//! The message-fit pass on a workflow task completion, against the plain offload path on the
//! same bytes, in the same run (BENCHMARKS.md, "Drop in: limits and message fit").
//!
//! `cargo bench -p payload-gateway-benches --bench fit`
//!
//! One `RespondWorkflowTaskCompleted` scheduling 60 activities with 150 KB inputs (each under
//! the 256 KiB threshold, 9 MB together), encoded with compression + AES-256-GCM and offloaded
//! to the in-memory driver:
//! - `plain offload`: threshold 64 KiB, no fit pass: the threshold offloads all 60.
//! - `fit`: threshold 256 KiB, the server's limits (4 MiB message): the fit pass chooses.
//!
//! And 60 activities with 10 KB inputs (nothing to offload): the fit pass on and off, for what
//! planning costs a message that already fits.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway::rewrite::{CallContext, Direction, Pipeline, message};
use payload_gateway::server_limits::Limits;
use payload_gateway::storage::Storage;
use payload_gateway_drivers::StorageDriver;
use payload_gateway_drivers::object::ObjectStoreDriver;
use payload_gateway_proto::method;
use prost::Message;
use temporalio_protos::protos::temporal::api::{
    command::v1::{Command, ScheduleActivityTaskCommandAttributes, command},
    common::v1::{ActivityType, Payload, Payloads},
    enums::v1::CommandType,
    workflowservice::v1::RespondWorkflowTaskCompletedRequest,
};

mod common;

const COMPLETE: &str =
    "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted";
const KIB: usize = 1024;

/// Bytes zstd barely shrinks (a base64-like alphabet from a xorshift stream).
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x & 63) as usize]
        })
        .collect()
}

fn completion(activities: usize, input: usize) -> Bytes {
    let commands = (0..activities)
        .map(|i| Command {
            command_type: CommandType::ScheduleActivityTask as i32,
            attributes: Some(command::Attributes::ScheduleActivityTaskCommandAttributes(
                ScheduleActivityTaskCommandAttributes {
                    activity_id: i.to_string(),
                    activity_type: Some(ActivityType {
                        name: "length_of".into(),
                    }),
                    input: Some(Payloads {
                        payloads: vec![Payload {
                            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                            data: incompressible(input, i as u64 + 1),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    RespondWorkflowTaskCompletedRequest {
        task_token: vec![7; 64],
        commands,
        identity: "bench".into(),
        namespace: "default".into(),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

fn pipeline(dir: &std::path::Path, threshold: usize) -> Pipeline {
    let codec = Arc::new(common::keyring_codec(dir));
    let driver: Arc<dyn StorageDriver> = Arc::new(ObjectStoreDriver::memory("mem", 1 << 30));
    let storage = Storage::with_drivers(vec![driver], "mem", threshold, 0);
    Pipeline::new(codec).with_storage(Some(Arc::new(storage)))
}

const SERVER: Limits = Limits {
    message: 4 * 1024 * 1024,
    blob: 2 * 1024 * 1024,
    memo: 2 * 1024 * 1024,
    completion: None,
};

fn fit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ty = method(COMPLETE).unwrap().request;
    let ctx = CallContext::new(COMPLETE, Some("default".to_owned()));
    let run = |p: &Pipeline, m: &Bytes, limits: Option<&Limits>| {
        rt.block_on(message::rewrite(
            p,
            Direction::Encode,
            &ctx,
            ty,
            m.clone(),
            limits,
        ))
        .unwrap()
    };
    let plain = pipeline(dir.path(), 64 * KIB);
    let fitting = pipeline(dir.path(), 256 * KIB);

    let large = completion(60, 150_000);
    // The figures the benchmark stands on: what each path forwards.
    let plain_out = run(&plain, &large, None);
    let fit_out = run(&fitting, &large, Some(&SERVER));
    let unfit_out = run(&fitting, &large, None);
    eprintln!(
        "60 x 150 KB completion: {} bytes in; plain offload forwards {} bytes; fit forwards {} \
         bytes (limit {}); without either {} bytes",
        large.len(),
        plain_out.len(),
        fit_out.len(),
        SERVER.message,
        unfit_out.len()
    );
    assert!(fit_out.len() <= SERVER.message);
    let mut g = c.benchmark_group("fit/completion 60x150KB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(large.len() as u64));
    g.bench_function("plain offload (threshold 64 KiB)", |b| {
        b.iter(|| black_box(run(&plain, &large, None)))
    });
    g.bench_function("fit (threshold 256 KiB, 4 MiB limit)", |b| {
        b.iter(|| black_box(run(&fitting, &large, Some(&SERVER))))
    });
    g.finish();

    let small = completion(60, 10_000);
    let mut g = c.benchmark_group("fit/completion 60x10KB (fits)");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("fit off", |b| {
        b.iter(|| black_box(run(&fitting, &small, None)))
    });
    g.bench_function("fit on", |b| {
        b.iter(|| black_box(run(&fitting, &small, Some(&SERVER))))
    });
    g.finish();
}

criterion_group!(benches, fit);
criterion_main!(benches);
