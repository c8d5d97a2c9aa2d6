fn main() {
    // The addon's link setup; the plain engine (`--no-default-features`) needs none.
    if std::env::var_os("CARGO_FEATURE_NAPI").is_some() {
        napi_build::setup();
    }
}
