//! Engine errors -> JS errors with a stable `code`.
//!
//! napi's async functions cannot carry a custom `code`, so the engine error is encoded into the
//! message as `MARKER + JSON { code, message, issues }`; `index.js` decodes it into an `Error` with
//! `code`, `issues` and the plain message. The marker cannot occur in ordinary messages.

use crate::error::HiveError;

/// Prefix of an encoded hive error message.
pub const MARKER: &str = "\u{1}hive-error:";

/// Encodes an engine error for JS.
pub fn to_napi(error: HiveError) -> napi::Error {
    let payload = serde_json::json!({
        "code": error.code().as_str(),
        "message": error.to_string(),
        "issues": error.issues(),
    });
    napi::Error::new(napi::Status::GenericFailure, format!("{MARKER}{payload}"))
}

/// `Result` conversion helper.
pub trait IntoNapi<T> {
    fn napi(self) -> napi::Result<T>;
}

impl<T> IntoNapi<T> for crate::error::Result<T> {
    fn napi(self) -> napi::Result<T> {
        self.map_err(to_napi)
    }
}
