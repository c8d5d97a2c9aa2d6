//! `#[napi]` exports only, each a few lines over the engine. The JS entry (`index.js`) wraps these
//! to turn encoded errors into `Error`s with an exact `code` (see [`error`]).

#![cfg_attr(test, allow(dead_code))] // #[napi] registration is compiled out of test builds

mod error;
mod events;
#[cfg(target_os = "linux")]
mod process;
mod sandbox;

use napi::bindgen_prelude::*;
use napi_derive::napi;

/// Module set-up, once per Node environment (the main thread, each worker thread): `HIVE_LOG`
/// diagnostics, and an owner for the sandboxes this environment opens, released (closing those
/// no other environment holds) when it exits.
#[napi(module_exports)]
pub fn init(mut _exports: Object, env: Env) -> Result<()> {
    crate::diagnostics::init_from_env();
    let owner = crate::sandbox::Owner::register();
    env.set_instance_data(owner, (), |_| {})?;
    env.add_env_cleanup_hook(owner, crate::sandbox::release_owner)?;
    Ok(())
}

/// The owner of the calling environment (set up by [`init`]).
fn owner_of(env: &Env) -> Option<crate::sandbox::Owner> {
    env.get_instance_data::<crate::sandbox::Owner>()
        .ok()
        .flatten()
        .map(|owner| *owner)
}
