//! hive's post-clone code, kept apart from the addon so the compiler checks what it may do:
//! `#![no_std]` without `alloc` (nothing here can allocate or take a lock), raw syscalls through
//! [`sys`] (nothing touches `errno`), and every `unsafe` block justified.
//!
//! Two halves:
//! 1. **Code linked into the addon** and run in a child of the host right after `clone`, sharing
//!    the host's memory (`CLONE_VM`), so it only reads what the parent prepared and never
//!    returns:
//!    - [`setup`]: the sandbox's setup child (network, listeners, mounts, Landlock rules, from a
//!      borrowed [`setup::Plan`]) and the capture helper;
//!    - [`stub`]: moves file descriptors into place and `execveat`s the `hive-init` executable
//!      from a sealed memfd (the end of the setup child and the whole spawn helper).
//! 2. **`hive-init`** (`src/bin/hive-init.rs`), a static executable of a few kB built from this
//!    crate, with two roles chosen by `argv[1]`:
//!    - `init` ([`init::reaper_main`]): PID 1 of a sandbox, a reaper holding nothing of the host;
//!    - `spawn` ([`spawn::shim_main`]): joins a sandbox's namespaces, starts the workload there
//!      as a child of the host process (`CLONE_PARENT`), confines it and executes the command.
//!
//! Because both roles are exec'd, no page of the host's memory (Node's heap, its argv and
//! environment) exists in a sandbox's PID namespace at any time, on every architecture.
//!
//! The wire format the host decodes (a [`stage::Stage`] and an errno, 8 bytes) lives in
//! [`stage`].
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod init;
pub mod setup;
pub mod spawn;
pub mod stage;
pub mod stub;
pub mod sys;

pub use stage::{decode_report, encode_report, Stage};
