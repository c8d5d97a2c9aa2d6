//! `hive-init`: the static executable the launcher runs from a sealed memfd (see the crate doc).
//! No libc: `_start` below reads the arguments from the initial stack, and the memory functions
//! the compiler may call are defined here.
#![no_std]
#![no_main]
#![no_builtins]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use core::ffi::CStr;

use hive_launcher::{init, spawn, sys};

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym entry,
);

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "mov x29, xzr",
    "mov x30, xzr",
    "mov x0, sp",
    "and x1, x0, #-16",
    "mov sp, x1",
    "bl {entry}",
    "brk #0",
    entry = sym entry,
);

#[cfg(target_arch = "riscv64")]
core::arch::global_asm!(
    ".globl _start",
    "_start:",
    ".option push",
    ".option norelax",
    "lla gp, __global_pointer$",
    ".option pop",
    "mv a0, sp",
    "andi sp, sp, -16",
    "call {entry}",
    "unimp",
    entry = sym entry,
);

/// Called by `_start` with the initial stack pointer: `argc`, then `argv[argc]`, NULL, `envp`,
/// NULL (the System V process start layout every Linux architecture shares).
///
/// # Safety
/// Only `_start` calls it, with the kernel's initial stack.
unsafe extern "C" fn entry(sp: *const usize) -> ! {
    // SAFETY: the kernel's initial stack starts with argc, then the argv pointers, a NULL, the
    // envp pointers and a NULL.
    let (argc, argv, envp) = unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *const *const u8;
        (argc, argv, argv.add(argc + 1))
    };
    let role = if argc >= 2 {
        // SAFETY: argv[1] exists (argc >= 2) and is NUL-terminated.
        unsafe { CStr::from_ptr((*argv.add(1)).cast()) }.to_bytes()
    } else {
        b""
    };
    match role {
        b"init" => init::reaper_main(),
        // SAFETY: argv/envp are this process's argument area, alive until it exits.
        b"spawn" => unsafe { spawn::shim_main(argc, argv, envp) },
        _ => {
            sys::write_all(2, b"hive-init: started by hive's launcher only\n");
            sys::exit(2)
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::exit(126)
}

// The memory functions the compiler emits calls to (there is no libc to provide them). Byte
// loops: `no_builtins` keeps them from being turned back into calls to themselves.

/// # Safety
/// `dst` valid for `n` writes.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: i < n and dst is valid for n bytes.
        unsafe { *dst.add(i) = c as u8 };
    }
    dst
}

/// # Safety
/// `dst` valid for `n` writes, `src` for `n` reads, not overlapping.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: i < n; both are valid for n bytes.
        unsafe { *dst.add(i) = *src.add(i) };
    }
    dst
}

/// # Safety
/// `dst` valid for `n` writes, `src` for `n` reads; they may overlap.
#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) < (src as usize) {
        for i in 0..n {
            // SAFETY: i < n; copying forwards never reads a byte already overwritten.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: i < n; copying backwards never reads a byte already overwritten.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    }
    dst
}

/// # Safety
/// `a` and `b` valid for `n` reads.
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n; both are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` valid for `n` reads.
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// `s` points at a NUL-terminated string.
#[no_mangle]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated, so every byte up to the NUL is readable.
    while unsafe { *s.add(n) } != 0 {
        n += 1;
    }
    n
}
