//! Named secrets at run time (docs/secrets.md): placeholders handed to the sandbox, the per-config
//! [`Table`] the proxy consults on every request, and the streaming response [`scrub`]ber.
//!
//! How a secret travels:
//! 1. `secrets.NAME` is validated into [`crate::config::NamedSecret`]; its value stays in Rust.
//! 2. Each sandbox draws one random placeholder per name ([`Placeholders`]), stable for the
//!    sandbox's lifetime; `env` values render `{{secrets.NAME}}` as that placeholder.
//! 3. Every config swap builds a [`Table`]: name, placeholder, value, the hosts the value may go
//!    to, and the scrubber's patterns. The proxy loads it with the policy, so a rotated value
//!    applies from the next request on every connection.
//! 4. The proxy substitutes placeholders for allowed hosts, refuses requests that carry one
//!    anywhere else, and scrubs responses to requests that carried a secret
//!    (`crate::proxy` `substitute` and `scrub`).

mod decode;
mod env;
mod placeholder;
pub mod scrub;
mod table;

pub use decode::{Decoder, Encoding, UnknownEncoding};
pub use env::process_env;
pub use placeholder::{Placeholders, PLACEHOLDER_LEN, PLACEHOLDER_PREFIX};
pub use table::{Entry, Table};
