'use strict';
// Deterministic test values, shared by the workflow bundle (no Node APIs there) and the harness.
//
// blob(n, seed, marker): `n` characters from a 64-letter alphabet drawn from a xorshift32 stream
// seeded by `seed` (zstd shrinks it to about 3/4, so it is "incompressible-looking"), with
// `[marker]` at the start of every 4 KiB. The marker is random per test run; the tests search raw
// history bytes for `[marker]` (the brackets tell the value from the bare marker, which workflows
// get as an argument): finding it there means plaintext of a value reached the server.

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const STEP = 4096;

function seedState(seed) {
  // FNV-1a of the seed string: any seed gives a non-zero 32-bit state.
  let h = 0x811c9dc5;
  const s = String(seed);
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h || 1;
}

function blob(n, seed, marker) {
  let x = seedState(seed);
  const parts = [];
  let chunk = [];
  for (let i = 0; i < n; i += STEP) {
    const len = Math.min(STEP, n - i);
    const head = `[${marker}]`.slice(0, len);
    chunk.length = 0;
    for (let j = head.length; j < len; j++) {
      x ^= x << 13;
      x >>>= 0;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      chunk.push(ALPHABET.charCodeAt(x & 63));
    }
    parts.push(head + String.fromCharCode.apply(null, chunk));
  }
  return parts.join('');
}

module.exports = { blob };
