//! Property tests: the wire walker against a reflective (prost-reflect) walk over random
//! messages of the payload-bearing WorkflowService types.

mod common;

use bytes::Bytes;
use common::*;
use payload_gateway_proto::{MessageType, methods, scan};
use proptest::prelude::*;
use prost::Message;
use prost_reflect::DynamicMessage;
use temporalio_protos::protos::temporal::api::common::v1::Payload;
use temporalio_protos::protos::temporal::api::workflowservice::v1 as ws;

/// Checks every property on one serialized message of type `name`.
fn check(name: &str, bytes: &Bytes, unknown: &[Vec<u8>]) -> usize {
    let ty = MessageType::by_name(name).unwrap();
    let s = scan(ty, bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    // Identity splice: zero-copy and byte-identical.
    let same_bytes = s.splice(bytes, &vec![None; s.sites().len()]).unwrap();
    assert_eq!(&same_bytes, bytes);
    let explicit: Vec<_> = s
        .sites()
        .iter()
        .map(|x| Some(bytes.slice(x.range())))
        .collect();
    assert_eq!(&s.splice(bytes, &explicit).unwrap(), bytes);
    for site in s.sites() {
        assert!(
            !site.path().to_string().contains("indexed_fields"),
            "{}",
            site.path()
        );
    }

    // The sites are exactly the payloads the reflective walk finds.
    let d = desc(name);
    let original = DynamicMessage::decode(d.clone(), bytes.clone()).unwrap();
    let mut found = Vec::new();
    reflect_visit(&mut original.clone(), &mut |p| {
        found.push(payload_key(&p.transcode_to::<Payload>().unwrap()))
    });
    let mut scanned: Vec<_> = s
        .sites()
        .iter()
        .map(|x| payload_key(&Payload::decode(&bytes[x.range()]).unwrap()))
        .collect();
    // Empty payloads may be absent on the wire (default map values): see `mark`.
    found.retain(|k| !k.0.is_empty() || !k.1.is_empty());
    scanned.retain(|k| !k.0.is_empty() || !k.1.is_empty());
    found.sort();
    scanned.sort();
    assert_eq!(
        scanned, found,
        "{name}: sites differ from the reflective walk"
    );

    // Marking every site equals marking every payload reflectively.
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let mut p = Payload::decode(&bytes[x.range()]).unwrap();
            mark(&mut p);
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let spliced = s.splice(bytes, &reps).unwrap();
    // The same splice as chunks: their concatenation is the spliced message, none empty.
    let chunks = s
        .splice_edits_chunks(
            bytes,
            &reps,
            &vec![None; s.failures().len()],
            &vec![None; s.failure_texts().len()],
        )
        .unwrap();
    assert!(chunks.iter().all(|c| !c.is_empty()), "{name}: empty chunk");
    assert_eq!(chunks.concat(), spliced.to_vec(), "{name}: chunks differ");
    let got = DynamicMessage::decode(d, spliced.clone()).expect("spliced message decodes");
    let mut want = original.clone();
    reflect_visit(&mut want, &mut |p| {
        let mut x = p.transcode_to::<Payload>().unwrap();
        mark(&mut x);
        p.transcode_from(&x).unwrap();
    });
    assert!(
        same(&got, &want),
        "{name}: spliced message differs from the reflectively marked one"
    );
    let again = scan(ty, &spliced).unwrap();
    assert_eq!(again.sites().len(), s.sites().len());

    // Unknown fields survive byte for byte.
    for u in unknown {
        assert!(
            contains(bytes, u) && contains(&spliced, u),
            "{name}: unknown field lost"
        );
    }
    s.sites().len()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn generate(name: &str, seed: u64, g: Gen) -> (Bytes, Vec<Vec<u8>>) {
    let mut rng = Rng(seed);
    let mut unknown = Vec::new();
    let m = gen_message(&desc(name), &mut rng, g, 0, &mut unknown);
    (Bytes::from(m.encode_to_vec()), unknown)
}

/// Re-encodes through the `temporalio-protos` prost type, so the bytes are exactly what
/// an SDK built on these types sends.
macro_rules! prost_types {
    ($($t:ident),* $(,)?) => {
        const REPRESENTATIVE: &[&str] = &[$(concat!("temporal.api.workflowservice.v1.", stringify!($t))),*];
        fn via_prost(name: &str, bytes: &[u8]) -> Bytes {
            $(
                if name == concat!("temporal.api.workflowservice.v1.", stringify!($t)) {
                    let m = ws::$t::decode(bytes).expect("prost decode");
                    return Bytes::from(m.encode_to_vec());
                }
            )*
            panic!("no prost type for {name}")
        }
    };
}

prost_types!(
    PollWorkflowTaskQueueResponse,
    RespondWorkflowTaskCompletedRequest,
    RespondWorkflowTaskFailedRequest,
    StartWorkflowExecutionRequest,
    SignalWithStartWorkflowExecutionRequest,
    SignalWorkflowExecutionRequest,
    ExecuteMultiOperationRequest,
    ExecuteMultiOperationResponse,
    QueryWorkflowRequest,
    QueryWorkflowResponse,
    RespondQueryTaskCompletedRequest,
    RespondActivityTaskFailedRequest,
    RespondActivityTaskCompletedRequest,
    RecordActivityTaskHeartbeatRequest,
    PollActivityTaskQueueResponse,
    GetWorkflowExecutionHistoryResponse,
    UpdateWorkflowExecutionRequest,
    UpdateWorkflowExecutionResponse,
    PollWorkflowExecutionUpdateResponse,
    PollNexusTaskQueueResponse,
    RespondNexusTaskCompletedRequest,
    RespondNexusTaskFailedRequest,
    DescribeWorkflowExecutionResponse,
    CreateScheduleRequest,
    DescribeScheduleResponse,
);

/// Every payload-bearing request/response type of WorkflowService.
fn workflow_service_types() -> Vec<&'static str> {
    let mut v: Vec<_> = methods()
        .filter(|m| {
            m.path
                .starts_with("/temporal.api.workflowservice.v1.WorkflowService/")
        })
        .flat_map(|m| [m.request, m.response])
        .filter(|t| t.can_hold_payloads())
        .map(|t| t.name())
        .collect();
    v.sort();
    v.dedup();
    v
}

const DEEP: Gen = Gen {
    max_depth: 7,
    unknown_fields: false,
};
const WITH_UNKNOWN: Gen = Gen {
    max_depth: 7,
    unknown_fields: true,
};

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Representative deeply nested types, built with the prost types.
    #[test]
    fn representative_types_via_prost(i in 0..REPRESENTATIVE.len(), seed in any::<u64>()) {
        let name = REPRESENTATIVE[i];
        let (dynamic, _) = generate(name, seed, DEEP);
        let bytes = via_prost(name, &dynamic);
        check(name, &bytes, &[]);
    }

    /// Every payload-bearing WorkflowService request/response type.
    #[test]
    fn every_workflow_service_type(i in 0..200usize, seed in any::<u64>()) {
        let types = workflow_service_types();
        let name = types[i % types.len()];
        let (bytes, _) = generate(name, seed, DEEP);
        check(name, &bytes, &[]);
    }

    /// Unknown fields inserted at random depths survive byte for byte.
    #[test]
    fn unknown_fields_survive(i in 0..REPRESENTATIVE.len(), seed in any::<u64>()) {
        let name = REPRESENTATIVE[i];
        let (bytes, unknown) = generate(name, seed, WITH_UNKNOWN);
        check(name, &bytes, &unknown);
    }
}

#[test]
fn every_workflow_service_type_once() {
    let types = workflow_service_types();
    assert!(
        types.len() > 60,
        "only {} payload-bearing types",
        types.len()
    );
    let (mut sites, mut unknowns) = (0, 0);
    for (i, name) in types.iter().enumerate() {
        for seed in 0..3 {
            let (bytes, unknown) = generate(name, i as u64 * 31 + seed, WITH_UNKNOWN);
            sites += check(name, &bytes, &unknown);
            unknowns += unknown.len();
        }
    }
    // The generator really fills payloads and unknown fields.
    assert!(sites > 3 * types.len(), "{sites} sites");
    assert!(unknowns > types.len(), "{unknowns} unknown fields");
}

/// Writes the fuzz seed corpus: `PGW_WRITE_CORPUS=1 cargo test -p payload-gateway-proto
/// --test properties write_fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_corpus() {
    if std::env::var_os("PGW_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/walker");
    std::fs::create_dir_all(&dir).unwrap();
    let types = payload_gateway_proto::fuzzing::fuzz_types();
    let small = Gen {
        max_depth: 5,
        unknown_fields: true,
    };
    let mut written = 0;
    for (seed, name) in REPRESENTATIVE
        .iter()
        .chain(["google.rpc.Status"].iter())
        .enumerate()
    {
        let ty = MessageType::by_name(name).unwrap();
        let idx = types.iter().position(|t| *t == ty).unwrap() as u8;
        for k in 0..3u64 {
            let (bytes, _) = generate(name, seed as u64 * 1000 + k, small);
            if bytes.len() > 6000 {
                continue;
            }
            let mut data = vec![idx];
            data.extend_from_slice(&bytes);
            let short = name.rsplit('.').next().unwrap();
            std::fs::write(dir.join(format!("{short}-{k}")), data).unwrap();
            written += 1;
        }
    }
    assert!(written > 20);
}

/// A large replacement is a chunk of its own, shared (not copied), between copied pieces
/// holding the rewritten length prefixes; the concatenation is the flat splice.
#[test]
fn a_large_replacement_is_shared_not_copied() {
    let request = ws::RespondActivityTaskCompletedRequest {
        task_token: b"token".to_vec(),
        namespace: "default".to_owned(),
        identity: "worker".to_owned(),
        result: Some(
            temporalio_protos::protos::temporal::api::common::v1::Payloads {
                payloads: vec![Payload {
                    metadata: Default::default(),
                    data: b"ref".to_vec(),
                    ..Default::default()
                }],
            },
        ),
        ..Default::default()
    };
    let bytes = Bytes::from(request.encode_to_vec());
    let ty =
        MessageType::by_name("temporal.api.workflowservice.v1.RespondActivityTaskCompletedRequest")
            .unwrap();
    let s = scan(ty, &bytes).unwrap();
    assert_eq!(s.sites().len(), 1);
    let big = Bytes::from(
        Payload {
            metadata: Default::default(),
            data: vec![7u8; 3 * payload_gateway_proto::SPLICE_SHARE_MIN],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let reps = vec![Some(big.clone())];
    let flat = s.splice(&bytes, &reps).unwrap();
    let chunks = s
        .splice_edits_chunks(
            &bytes,
            &reps,
            &vec![None; s.failures().len()],
            &vec![None; s.failure_texts().len()],
        )
        .unwrap();
    assert_eq!(chunks.concat(), flat.to_vec());
    let shared = chunks
        .iter()
        .find(|c| c.len() == big.len())
        .expect("the replacement is a chunk of its own");
    assert_eq!(shared.as_ptr(), big.as_ptr(), "shared, not copied");
    assert!(chunks.iter().all(|c| !c.is_empty()));
    let decoded = ws::RespondActivityTaskCompletedRequest::decode(flat).unwrap();
    assert_eq!(
        decoded.result.unwrap().payloads[0].data.len(),
        3 * payload_gateway_proto::SPLICE_SHARE_MIN
    );
}
