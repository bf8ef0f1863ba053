//! Benchmarks for the payload walker live in `benches/walker.rs`.
