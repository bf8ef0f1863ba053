use std::io::{Read, Write};
use std::time::Instant;
fn json(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{{\"id\":{i},\"name\":\"user-{}\",\"score\":{}.{},\"tags\":[\"a\",\"b\"]}},", i * 7919 % 1000, i % 97, i * 31 % 100).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}
fn random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x >> 24) as u8 }).collect()
}
fn main() {
    let backend = if cfg!(feature = "zrs") { "zlib-rs" } else { "miniz_oxide" };
    for (name, data) in [("random 48 MiB", random(48 << 20)), ("json 16 MiB", json(16 << 20)), ("json 64 KiB", json(64 << 10)), ("random 1 MiB", random(1 << 20))] {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        let t = Instant::now();
        enc.write_all(&data).unwrap();
        let gz = enc.finish().unwrap();
        let deflate_s = t.elapsed().as_secs_f64();
        let reps = if data.len() > (1 << 20) { 5 } else { 200 };
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            let mut out = Vec::with_capacity(data.len());
            flate2::bufread::MultiGzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(out.len(), data.len());
        }
        println!("{backend:12} {name:14} compressed {:>9} B  deflate-6 {:7.1} MiB/s  inflate {:7.1} MiB/s ({:.2} ms)", gz.len(), data.len() as f64 / deflate_s / 1048576.0, data.len() as f64 / best / 1048576.0, best * 1e3);
    }
}
