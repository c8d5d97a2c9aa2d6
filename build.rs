fn main() {
    // Without this, cargo reruns the script (and rebuilds hive) whenever any file under the
    // package changes, including fuzz/target/ while the fuzzers run.
    println!("cargo:rerun-if-changed=build.rs");
    // The addon's link setup; the plain engine (`--no-default-features`) needs none.
    if std::env::var_os("CARGO_FEATURE_NAPI").is_some() {
        napi_build::setup();
    }
}
