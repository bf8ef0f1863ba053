//! Shared helpers of the criterion benchmarks in `benches/benches/` (codec, envelope).

/// Deterministic JSON-like records: repeated field names, random ids, amounts and words —
/// compresses about 3-4x with zstd level 3, like typical workflow inputs.
pub fn json_like(len: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
        "tango", "uniform", "victor", "whiskey", "xray",
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(len + 256);
    out.push(b'[');
    while out.len() < len {
        let r = next();
        let note: Vec<&str> = (0..4).map(|_| WORDS[(next() % 24) as usize]).collect();
        out.extend_from_slice(
            format!(
                "{{\"orderId\":\"{:016x}\",\"customer\":{{\"id\":{},\"email\":\"{}.{}@example.com\"}},\
                 \"amount\":{}.{:02},\"currency\":\"{}\",\"createdAt\":\"2024-{:02}-{:02}T{:02}:{:02}:{:02}Z\",\
                 \"note\":\"{}\"}},",
                r,
                r % 1_000_000,
                WORDS[(r >> 20) as usize % 24],
                r % 997,
                r % 10_000,
                (r >> 8) % 100,
                ["USD", "EUR", "GBP"][(r >> 30) as usize % 3],
                1 + (r >> 12) % 12,
                1 + (r >> 16) % 28,
                (r >> 24) % 24,
                (r >> 32) % 60,
                (r >> 40) % 60,
                note.join(" "),
            )
            .as_bytes(),
        );
    }
    out.truncate(len);
    out
}
