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

/// Module set-up: `HIVE_LOG` diagnostics and closing every sandbox when the Node env exits.
#[napi(module_exports)]
pub fn init(mut _exports: Object, env: Env) -> Result<()> {
    crate::diagnostics::init_from_env();
    env.add_env_cleanup_hook((), |_| crate::sandbox::close_all())?;
    Ok(())
}
