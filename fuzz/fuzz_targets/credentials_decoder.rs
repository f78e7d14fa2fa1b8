//! Feeds arbitrary bytes to the decoders of a credentials directory's files, as a
//! corrupt or hostile `ca.pem`, `host.pem`, `host.key` or `token.key` would reach them:
//! PEM decoding, the TLS configuration built from what decoded, and a certificate's
//! class must return errors, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use proto::tls::{self, Credentials, credentials};

fuzz_target!(|data: &[u8]| {
    // Three files out of one input: two length bytes each for the first two.
    let Some((&[a, b, c, d], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let ca_len = usize::from(u16::from_le_bytes([a, b])).min(rest.len());
    let (ca, rest) = rest.split_at(ca_len);
    let cert_len = usize::from(u16::from_le_bytes([c, d])).min(rest.len());
    let (cert, key) = rest.split_at(cert_len);
    let here = Path::new("fuzz");
    let _ = credentials::token_key(key, here);
    let ca = credentials::certificate(ca, here);
    let cert = credentials::certificate(cert, here);
    let key = credentials::private_key(key, here);
    if let Ok(cert) = &cert {
        let _ = tls::classify(cert);
    }
    if let (Ok(ca), Ok(cert), Ok(key)) = (ca, cert, key) {
        let _ = tls::Tls::new(&Credentials { ca, cert, key });
    }
});
