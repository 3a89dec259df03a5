//! LoRA (Hu et al., 2021): a frozen linear layer `x·W` plus a trained low-rank update
//! `(α/r)·x·A·B`, with `A` `(in, r)` and `B` `(r, out)`, `B` starting at zero so training starts
//! from the base model exactly. The frozen base layer is a linear kernel without weight
//! gradients (`Dense::train` false).

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::layers::{A2, P2};

/// The linear layers of a block that can carry an adapter, by their HF names: GPT-2's
/// (`attn.c_attn`, …) and the Llama family's module names, as PEFT's `target_modules` gives
/// them (`q_proj`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum LoraTarget {
    #[serde(rename = "attn.c_attn")]
    AttnCAttn,
    #[serde(rename = "attn.c_proj")]
    AttnCProj,
    #[serde(rename = "mlp.c_fc")]
    MlpCFc,
    #[serde(rename = "mlp.c_proj")]
    MlpCProj,
    #[serde(rename = "q_proj")]
    QProj,
    #[serde(rename = "k_proj")]
    KProj,
    #[serde(rename = "v_proj")]
    VProj,
    #[serde(rename = "o_proj")]
    OProj,
    #[serde(rename = "gate_proj")]
    GateProj,
    #[serde(rename = "up_proj")]
    UpProj,
    #[serde(rename = "down_proj")]
    DownProj,
}

impl LoraTarget {
    /// GPT-2's, then the Llama family's.
    pub const GPT: [LoraTarget; 4] = [
        LoraTarget::AttnCAttn,
        LoraTarget::AttnCProj,
        LoraTarget::MlpCFc,
        LoraTarget::MlpCProj,
    ];
    pub const LLAMA: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The name as written in a pipeline and in PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::AttnCAttn => "attn.c_attn",
            LoraTarget::AttnCProj => "attn.c_proj",
            LoraTarget::MlpCFc => "mlp.c_fc",
            LoraTarget::MlpCProj => "mlp.c_proj",
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// The module's path inside a block (`attn.c_attn`, `self_attn.q_proj`, `mlp.up_proj`).
    pub fn path(self) -> String {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                format!("self_attn.{}", self.name())
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => {
                format!("mlp.{}", self.name())
            }
            _ => self.name().to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }
}

/// One adapter: `A` `(in, r)`, `B` `(r, out)` (PEFT stores both transposed, as `nn.Linear`s).
pub struct Lora<D: Device<f32>> {
    pub a: P2<D>,
    pub b: P2<D>,
    pub scale: f32,
}

impl<D: Device<f32>> Lora<D> {
    /// `A` as PEFT initialises it (Kaiming-uniform with a = √5, i.e. U(±1/√in)), `B` zero.
    pub fn new(dev: &D, inputs: usize, outputs: usize, config: &LoraConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (inputs as f32).sqrt();
        let a: Vec<f32> = (0..inputs * config.r)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Lora {
            a: dev.tensor_from_vec(a, (inputs, config.r)),
            b: dev.zeros_like(&(config.r, outputs)),
            scale: config.scale(),
        }
    }

    /// `scale · x·A·B`; `x` is the layer's input after LoRA dropout.
    pub fn forward<T: Tape<f32, D>>(&self, x: A2<D, T>) -> A2<D, T> {
        x.matmul(self.a.retaped::<T>())
            .matmul(self.b.retaped::<T>())
            * self.scale
    }

    /// The update `scale · A·B`, `(in, out)`, to merge into the base weight.
    pub fn delta(&self) -> P2<D> {
        self.a.clone().matmul(self.b.clone()) * self.scale
    }
}
