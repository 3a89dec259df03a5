//! Smelt's stage kinds, one module each. The binary registers them with [`registry`].

pub mod command;

use smelt_engine::Registry;

/// Every built-in stage kind.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register(command::Command);
    registry
}
