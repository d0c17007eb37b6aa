//! A multifd channel: the magic `11 22 33 44` followed by arbitrary bytes (seeds are
//! multifd captures without their first 4 bytes), with a page size hint given at the start
//! (as the proxy does once the main channel learned it) or at a chosen offset, and
//! `follow_phase` calls at chosen offsets. Same checks as `main_stream` (`common.rs`).
#![no_main]

mod common;

use common::{Action, Plan, Rng, check, random_actions, random_cuts, random_hint, random_phase};
use libfuzzer_sys::fuzz_target;
use migshaper::qemu::StreamParser;

const MAGIC: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

fuzz_target!(|input: &[u8]| {
    let mut data = Vec::with_capacity(MAGIC.len() + input.len());
    data.extend_from_slice(&MAGIC);
    data.extend_from_slice(input);
    let mut rng = Rng::new(input);
    // The hint: before the first byte (3 times in 4: the usual case) or later.
    let hint_at = if rng.below(4) == 0 {
        rng.below(data.len() + 1)
    } else {
        0
    };
    let mut actions = vec![(hint_at, Action::Hint(random_hint(&mut rng)))];
    actions.extend(random_actions(&mut rng, data.len(), 3, |r| {
        Action::Follow(random_phase(r))
    }));
    actions.sort_by_key(|&(at, _)| at);
    let cuts = random_cuts(&mut rng, data.len());
    check::<StreamParser>(&data, &Plan { actions, cuts });
});
