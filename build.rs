//! Build script: napi's link setup, and the `hive-init` executable the launcher embeds
//! (`crates/launcher`, see docs/isolation.md).
//!
//! `hive-init` is a static, libc-free program of a few kB. It is built by a nested `cargo build`
//! of the `hive-launcher` package for the same target, in its own target directory (the outer
//! build holds the lock on ours), always optimized, with the flags a program without libc needs;
//! `src/sandbox/linux/image.rs` embeds the result with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    napi_build::setup();
    build_init();
}

fn build_init() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let out = PathBuf::from(env("OUT_DIR"));
    let target = env("TARGET");
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("crates/launcher/Cargo.toml");
    println!("cargo:rerun-if-changed=crates/launcher/src");
    println!("cargo:rerun-if-changed=crates/launcher/Cargo.toml");
    let target_dir = out.join("init-target");
    let flags = [
        "-Cpanic=abort",
        "-Crelocation-model=static",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
    ]
    .join("\x1f");
    let status = Command::new(env("CARGO"))
        .args([
            "build",
            "--release",
            "--offline",
            "--package",
            "hive-launcher",
        ])
        .args([
            "--bin",
            "hive-init",
            "--features",
            "init-bin",
            "--target",
            &target,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The outer build's settings are not this program's: no wrapper (clippy), no target or
        // target-dir override, no flags meant for the addon.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .status()
        .expect("running cargo to build hive-init");
    assert!(status.success(), "building hive-init failed");
    let built = target_dir.join(&target).join("release/hive-init");
    std::fs::copy(&built, out.join("hive-init")).expect("copying hive-init into OUT_DIR");
}
