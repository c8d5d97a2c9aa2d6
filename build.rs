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
    println!("cargo:rerun-if-changed=build.rs");
    // The addon's link setup; the plain engine (`--no-default-features`, the fuzz targets) needs
    // none.
    if std::env::var_os("CARGO_FEATURE_NAPI").is_some() {
        napi_build::setup();
    }
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
    // rust-lld (shipped with rustup's toolchains) links for any target without a C toolchain, so
    // cross builds need no cross gcc; the C compiler driver is the fallback (distribution rustc).
    let linkers: [&[&str]; 2] = [
        &[
            "-Clinker=rust-lld",
            "-Clinker-flavor=ld.lld",
            "-Clink-arg=-static",
        ],
        &[
            "-Clink-arg=-nostartfiles",
            "-Clink-arg=-nostdlib",
            "-Clink-arg=-static",
        ],
    ];
    let built_with = |link: &[&str]| {
        let mut flags = vec!["-Cpanic=abort", "-Crelocation-model=static"];
        flags.extend_from_slice(link);
        Command::new(env("CARGO"))
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
            .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
            // The outer build's settings are not this program's: no wrapper (clippy), no target
            // or target-dir override, no flags meant for the addon.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CLIPPY_ARGS")
            .env_remove("CARGO_PRIMARY_PACKAGE")
            .status()
            .expect("running cargo to build hive-init")
            .success()
    };
    assert!(
        linkers.iter().any(|link| built_with(link)),
        "building hive-init failed"
    );
    let built = target_dir.join(&target).join("release/hive-init");
    std::fs::copy(&built, out.join("hive-init")).expect("copying hive-init into OUT_DIR");
}
