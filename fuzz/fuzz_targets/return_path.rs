//! Any bytes as the destination→source side of the main connection: `ReturnPathParser`
//! must never panic, put every byte in the return-path phase, and give the same counters
//! and events however the bytes are split (see `common.rs`).
#![no_main]

mod common;

use common::{Plan, Rng, check, random_cuts};
use libfuzzer_sys::fuzz_target;
use migshaper::qemu::ReturnPathParser;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::new(data);
    let cuts = random_cuts(&mut rng, data.len());
    check::<ReturnPathParser>(
        data,
        &Plan {
            actions: Vec::new(),
            cuts,
        },
    );
});
