//! Payload codec benchmarks: AES-256-GCM implementations side by side, the codec's
//! encode/decode against raw zstd + raw AES-GCM calls on the same data, and batch
//! inline-vs-parallel crossover. Results and how to read them: BENCHMARKS.md, "Codec".
//!
//! `cargo bench -p payload-gateway-benches --bench codec`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway::codec::{PayloadCodec, WirePayload};
use payload_gateway_benches::json_like;
use prost::Message;

mod common;

use common::KEY;
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// A serialized Payload of `len` bytes of JSON-like data.
fn payload(len: usize) -> Vec<u8> {
    WirePayload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: json_like(len).into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn codec(dir: &std::path::Path) -> PayloadCodec {
    common::keyring_codec(dir)
}

fn label(len: usize) -> String {
    if len >= MIB {
        format!("{}MiB", len / MIB)
    } else {
        format!("{}KiB", len / KIB)
    }
}

fn quick<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// Seal in place: ring vs aws-lc-rs vs RustCrypto aes-gcm.
fn aead(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &KEY).unwrap(),
    );
    let awslc_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &KEY).unwrap(),
    );
    let rc_key = aes_gcm::Aes256Gcm::new((&KEY).into());
    for len in [16 * KIB, 256 * KIB] {
        let mut g = quick(c, "aead_seal");
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = json_like(len);
        g.bench_function(BenchmarkId::new("ring", label(len)), |b| {
            b.iter(|| {
                let n = ring::aead::Nonce::assume_unique_for_key([7; 12]);
                ring_key
                    .seal_in_place_separate_tag(n, ring::aead::Aad::empty(), &mut buf)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("aws-lc-rs", label(len)), |b| {
            b.iter(|| {
                let n = aws_lc_rs::aead::Nonce::assume_unique_for_key([7; 12]);
                awslc_key
                    .seal_in_place_separate_tag(n, aws_lc_rs::aead::Aad::empty(), &mut buf)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("aes-gcm", label(len)), |b| {
            b.iter(|| {
                rc_key
                    .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&[7; 12]), b"", &mut buf)
                    .unwrap()
            })
        });
        g.finish();
    }
}

/// Codec encode/decode vs the raw calls it is made of (zstd level 3 with a reused context,
/// aws-lc-rs AES-256-GCM as in the codec), on the same serialized payload.
fn codec_vs_raw(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let ring_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &KEY).unwrap(),
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    compressor.include_contentsize(true).unwrap();
    let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
    for len in [KIB, 64 * KIB, MIB, 16 * MIB] {
        let input = payload(len);
        let encoded = codec.encode(None, &input).unwrap().unwrap();
        let raw_sealed = {
            let mut frame = compressor.compress(&input).unwrap();
            let tag = ring_key
                .seal_in_place_separate_tag(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                    aws_lc_rs::aead::Aad::empty(),
                    &mut frame,
                )
                .unwrap();
            frame.extend_from_slice(tag.as_ref());
            frame
        };
        eprintln!(
            "codec {}: serialized {} B -> encoded {} B (ratio {:.2})",
            label(len),
            input.len(),
            encoded.len(),
            input.len() as f64 / encoded.len() as f64
        );
        let mut g = quick(c, "encode");
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(BenchmarkId::new("codec", label(len)), |b| {
            b.iter(|| codec.encode(None, black_box(&input)).unwrap())
        });
        g.bench_function(BenchmarkId::new("raw_zstd_seal", label(len)), |b| {
            b.iter(|| {
                let mut frame = compressor.compress(black_box(&input)).unwrap();
                let mut nonce = [0u8; 12];
                aws_lc_rs::rand::SecureRandom::fill(&rng, &mut nonce).unwrap();
                let tag = ring_key
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                        aws_lc_rs::aead::Aad::empty(),
                        &mut frame,
                    )
                    .unwrap();
                frame.extend_from_slice(tag.as_ref());
                frame
            })
        });
        g.finish();

        let mut g = quick(c, "decode");
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(BenchmarkId::new("codec", label(len)), |b| {
            b.iter(|| codec.decode(black_box(&encoded)).unwrap())
        });
        g.bench_function(BenchmarkId::new("raw_open_unzstd", label(len)), |b| {
            b.iter(|| {
                let mut buf = raw_sealed.clone();
                let plain = ring_key
                    .open_in_place(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                        aws_lc_rs::aead::Aad::empty(),
                        &mut buf,
                    )
                    .unwrap();
                decompressor.decompress(plain, input.len()).unwrap()
            })
        });
        g.finish();
    }
}

/// encode_batch inline (threshold = MAX) vs parallel (threshold = 0).
fn batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let codec = codec(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (count, len) in [
        (1000, KIB),
        (8, 16 * KIB),
        (8, 32 * KIB),
        (8, 128 * KIB),
        (8, MIB),
    ] {
        let one = Bytes::from(payload(len));
        let batch: Vec<Bytes> = vec![one; count];
        let total: usize = batch.iter().map(Bytes::len).sum();
        let mut g = quick(c, "encode_batch");
        g.throughput(Throughput::Bytes(total as u64));
        let name = format!("{count}x{}", label(len));
        for (mode, threshold) in [("inline", usize::MAX), ("parallel", 0)] {
            g.bench_function(BenchmarkId::new(mode, &name), |b| {
                codec.set_parallel_threshold(threshold);
                b.iter(|| {
                    rt.block_on(codec.encode_batch(None, batch.clone()))
                        .unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, aead, codec_vs_raw, batches);
criterion_main!(benches);
