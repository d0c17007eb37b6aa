//! `Config::from_toml` on any text: never panics; an accepted config validates again and
//! every error formats.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use migshaper::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            assert!(
                !config.routes.is_empty(),
                "accepted a config without routes"
            );
            if let Err(e) = config.validate("fuzz.toml") {
                panic!("accepted config fails validate: {e}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
