//! Base64 for HTTP Basic credentials (RFC 7617 §2: the standard alphabet of RFC 4648 §4), through the `base64`
//! crate. Both directions go through the buffers the caller gives: no allocation on the handshake path.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};

/// The standard alphabet with `padding` written on output and `mode` required on input. Non-zero bits after the
/// last full byte are accepted, as before this crate was used: they carry no data, and rejecting them would lock
/// out a client that sent the right password.
const fn engine(padding: bool, mode: DecodePaddingMode) -> GeneralPurpose {
    let config = GeneralPurposeConfig::new()
        .with_encode_padding(padding)
        .with_decode_padding_mode(mode)
        .with_decode_allow_trailing_bits(true);
    GeneralPurpose::new(&alphabet::STANDARD, config)
}

/// Padded on output and for input whose length is a multiple of 4.
const PADDED: GeneralPurpose = engine(true, DecodePaddingMode::RequireCanonical);

/// For input whose length is not a multiple of 4: some clients strip the padding (RFC 4648 §3.2 lets a
/// specification allow that), but half a padding ("Zg=") is an error, not a third form.
const UNPADDED: GeneralPurpose = engine(false, DecodePaddingMode::RequireNone);

/// Length of the padded encoding of `n` bytes (RFC 4648 §4): 4 characters per started 3-byte group.
pub const fn encoded_len(n: usize) -> usize {
    match base64::encoded_len(n, true) {
        Some(len) => len,
        None => usize::MAX,
    }
}

/// Encodes `input` as padded standard base64 into `out`; returns the length written, or 0 if `out` is shorter
/// than [`encoded_len`]`(input.len())` (empty input also gives 0, its correct length).
pub fn encode(input: &[u8], out: &mut [u8]) -> usize {
    PADDED.encode_slice(input, out).unwrap_or(0)
}

/// Decodes standard base64, with its padding or with none, into `out`; `None` if the input is not base64 or `out` is too short.
pub fn decode(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let engine = if input.len().is_multiple_of(4) {
        &PADDED
    } else {
        &UNPADDED
    };
    engine.decode_slice(input, out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// RFC 4648 §10 vectors, the RFC 7617 §2 example and the two non-alphanumeric characters.
    const VECTORS: [(&[u8], &[u8]); 10] = [
        (b"", b""),
        (b"f", b"Zg=="),
        (b"fo", b"Zm8="),
        (b"foo", b"Zm9v"),
        (b"foob", b"Zm9vYg=="),
        (b"fooba", b"Zm9vYmE="),
        (b"foobar", b"Zm9vYmFy"),
        (b"Aladdin:open sesame", b"QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        (&[0xff, 0xff, 0xff], b"////"),
        (&[0xfb, 0xef, 0xbe], b"++++"),
    ];

    #[test]
    fn encode_vectors() {
        for (plain, encoded) in VECTORS {
            let mut out = [0u8; 64];
            let n = encode(plain, &mut out);
            assert_eq!(&out[..n], encoded);
            assert_eq!(n, encoded_len(plain.len()));
            if n > 0 {
                assert_eq!(encode(plain, &mut out[..n - 1]), 0, "short buffer");
            }
        }
    }

    #[test]
    fn decode_vectors() {
        let unpadded: [(&[u8], &[u8]); 3] = [
            (b"Zg", b"f"),
            (b"Zm8", b"fo"),
            (b"+/+/", &[0xfb, 0xff, 0xbf]),
        ];
        for (plain, encoded) in VECTORS.into_iter().chain(unpadded.map(|(e, p)| (p, e))) {
            let mut out = [0u8; 32];
            let n = decode(encoded, &mut out);
            assert_eq!(n.map(|n| &out[..n]), Some(plain), "{encoded:?}");
        }
        for bad in [
            &b"Z"[..],
            b"Z===",
            b"Zg=",
            b"Zg=a",
            b"Zm9v!",
            b"Zm 9v",
            b"=",
            b"Zm9vY",
            b"Zg==Zg==",
            b"-_-_",
        ] {
            assert_eq!(decode(bad, &mut [0u8; 16]), None, "{bad:?}");
        }
        assert_eq!(decode(b"Zm9v", &mut [0u8; 2]), None, "short buffer");
        let mut out = [0u8; 4];
        assert_eq!(
            decode(b"Zh==", &mut out),
            Some(1),
            "unused low bits are ignored"
        );
        assert_eq!(out[0], b'f');
    }
}
