//! `#[napi]` exports only, each a few lines over the engine.
