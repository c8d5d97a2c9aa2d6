//! Path normalization and glob matching. Input: `glob \n path`. Checks normalization is idempotent
//! and that matching never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (glob, path) = text.split_once('\n').unwrap_or((text, "/"));
    let once = hive::config::normalize_path(path);
    assert_eq!(
        hive::config::normalize_path(&once),
        once,
        "normalize_path is not idempotent"
    );
    if let Ok(g) = hive::config::PathGlob::parse(glob) {
        let _ = g.matches(&once);
        let _ = g.literal_prefix();
    }
});
