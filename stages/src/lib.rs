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
pub mod plot;
pub mod pretrain;
pub mod records;
pub mod tokenize;
pub mod training;

#[cfg(test)]
mod testing;

use smelt_engine::Registry;

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
