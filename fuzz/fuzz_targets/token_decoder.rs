//! Fuzzes what every server decodes from a request's token: the body read without a
//! check (`holdfast tokens`) and the full verification (signature, cell, expiry).
//! Invariant: no input panics, and none verifies under a key that did not sign it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{SealedToken, Timestamp, TokenKey};

fuzz_target!(|data: &[u8]| {
    let token = SealedToken(data.to_vec());
    let _ = token.unverified_body();
    let key = TokenKey::from_secret([7; 32]);
    let now = Timestamp { secs: 1_000, nanos: 0 };
    // Arbitrary bytes are never a signature of this key: verification must refuse them.
    assert!(key.verifier("fuzz.test").verify(&token, now).is_err());
});
