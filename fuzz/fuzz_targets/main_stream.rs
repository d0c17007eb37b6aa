//! Any bytes as the source→destination side of a connection: `StreamParser` must
//! recognise some channel kind, never panic, attribute every byte to a phase, and give the
//! same counters and events however the bytes are split (see `common.rs`). The plan (split
//! points, page size hints and `follow_phase` calls at chosen offsets) is derived from the
//! input, so a raw capture is a valid seed.
#![no_main]

mod common;

use common::{Action, Plan, Rng, check, random_actions, random_cuts, random_hint, random_phase};
use libfuzzer_sys::fuzz_target;
use migshaper::qemu::StreamParser;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::new(data);
    let actions = random_actions(&mut rng, data.len(), 3, |r| {
        if r.below(2) == 0 {
            Action::Hint(random_hint(r))
        } else {
            Action::Follow(random_phase(r))
        }
    });
    let cuts = random_cuts(&mut rng, data.len());
    check::<StreamParser>(data, &Plan { actions, cuts });
});
