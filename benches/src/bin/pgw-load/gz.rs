//! Request encodings (`--request-encodings`): uncompressed gRPC frames, or gzip-compressed
//! ones the way the SDKs send them (`grpc-encoding: gzip`, compressed flag 1, the whole
//! message deflated at zlib's default level 6); and a one-entry memo so that compressing or
//! inflating the same bytes again (the echo upstream's responses, the client reading them)
//! does not load the shared cores with work that is not the proxy's.

use std::io::{Read, Write};
use std::sync::Mutex;

use anyhow::{Result, bail};
use bytes::Bytes;
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

/// How the load client encodes its requests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum ReqEnc {
    /// Uncompressed frames (flag 0), no `grpc-encoding`.
    Identity,
    /// `grpc-encoding: gzip` and `grpc-accept-encoding: gzip`, every request frame
    /// compressed (flag 1), as the Python SDK sends requests by default.
    Gzip,
}

impl ReqEnc {
    /// Name in tables, CSV and `--request-encodings`.
    pub fn label(self) -> &'static str {
        match self {
            ReqEnc::Identity => "identity",
            ReqEnc::Gzip => "gzip",
        }
    }

    /// Words for table titles.
    pub fn describe(self) -> &'static str {
        match self {
            ReqEnc::Identity => "requests uncompressed",
            ReqEnc::Gzip => {
                "requests gzip (`grpc-encoding: gzip`, compressed flag 1, zlib level 6; `grpc-accept-encoding: gzip`)"
            }
        }
    }
}

/// The largest message [`gunzip`] inflates to.
pub const MAX_INFLATED: u64 = 64 << 20;

/// `data` as one gzip member at zlib's default level (6), what tonic's and grpcio's gzip
/// compressors produce.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(
        Vec::with_capacity(data.len() / 3 + 64),
        Compression::default(),
    );
    e.write_all(data).expect("write to a Vec");
    e.finish().expect("finish into a Vec")
}

/// Inflates every gzip member of `data` (as a Go gRPC server reads a gzip frame), refusing
/// more than [`MAX_INFLATED`] bytes.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 4);
    MultiGzDecoder::new(data)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_INFLATED {
        bail!("gzip message inflates beyond {MAX_INFLATED} bytes");
    }
    Ok(out)
}

/// The last input and what `f` made of it: the same input again skips `f` (one byte
/// comparison instead of a compression or an inflation).
#[derive(Default)]
pub struct Memo(Mutex<Option<(Bytes, Bytes)>>);

impl Memo {
    /// `f(input)`, or the remembered output when `input` equals the last input.
    pub fn get_or(&self, input: &Bytes, f: impl FnOnce(&[u8]) -> Result<Bytes>) -> Result<Bytes> {
        if let Some((i, o)) = self.0.lock().expect("memo").as_ref()
            && i == input
        {
            return Ok(o.clone());
        }
        let out = f(input)?;
        *self.0.lock().expect("memo") = Some((input.clone(), out.clone()));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gzip then gunzip gives the input back; two members are read as one message (the
    /// server's reading); a bomb past the limit is refused; the memo returns its output for
    /// equal input only.
    #[test]
    fn gzip_round_trip_members_limit_and_memo() {
        let data = b"{\"id\":\"0001\",\"status\":\"pending\"}".repeat(100);
        let z = gzip(&data);
        assert!(z.len() < data.len() / 4, "{} of {}", z.len(), data.len());
        assert_eq!(gunzip(&z).unwrap(), data);
        let mut two = gzip(b"first ");
        two.extend(gzip(b"second"));
        assert_eq!(gunzip(&two).unwrap(), b"first second");
        let bomb = gzip(&vec![0u8; MAX_INFLATED as usize + 1]);
        assert!(gunzip(&bomb).is_err());

        let memo = Memo::default();
        let calls = std::cell::Cell::new(0);
        let f = |b: &[u8]| {
            calls.set(calls.get() + 1);
            Ok(Bytes::from(gzip(b)))
        };
        let a = Bytes::from_static(b"aaaa");
        let b = Bytes::from_static(b"bbbb");
        let za = memo.get_or(&a, f).unwrap();
        assert_eq!(memo.get_or(&a.clone(), f).unwrap(), za);
        assert_eq!(calls.get(), 1);
        let zb = memo.get_or(&b, f).unwrap();
        assert_eq!(calls.get(), 2);
        assert_eq!(gunzip(&zb).unwrap(), b"bbbb");
    }
}
