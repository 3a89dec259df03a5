//! Smelt's stage kinds, one module each, and the data model they share. The binary registers
//! them with [`registry`].

pub mod bench;
pub mod clean;
pub mod collect;
pub mod command;
pub mod dpo;
pub mod evaluate;
pub mod finetune;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod params;
pub mod plot;
pub mod pretrain;
pub mod records;
pub mod tokenize;
pub mod training;

#[cfg(test)]
mod testing;

use std::cell::Cell;

use smelt_engine::Registry;

thread_local! {
    /// Set while [`catch_panic`] runs its closure on this thread.
    static CATCHING_PANIC: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into an error carrying its message: for libraries that panic on
/// bad input (`tokenizers` has `expect`s in its deserializers) where smelt must report it.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING_PANIC.replace(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING_PANIC.set(outer);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into())
    })
}

/// Every built-in stage kind.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register(clean::Clean)
        .register(collect::Collect)
        .register(command::Command)
        .register(dpo::Dpo)
        .register(evaluate::Evaluate)
        .register(finetune::Finetune)
        .register(pretrain::Pretrain)
        .register(tokenize::Tokenize);
    registry
}
